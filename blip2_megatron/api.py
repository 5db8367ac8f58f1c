"""The entry points users call from Python and ``launch/``, in LAVIS's spirit.

* :func:`load_model_and_preprocess`: ``(model, image_processors, text_processors)`` from a
  local Hugging Face Blip2 or InstructBlip directory, a run or checkpoint directory of ours (any TP x PP
  layout), or a flavour name (random weights unless overrides name weight files).
* :func:`load_trained_model`: the model of a run (or a job config) for evaluation.
* :func:`export_to_hf`: a run as a directory ``transformers`` loads.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip2_megatron import accelerator
from blip2_megatron.build import build_from_hf_blip2, load_trained_model, predictor_for
from blip2_megatron.config import ConfigError, load_job_config
from blip2_megatron.convert.hf_blip2 import export_hf_blip2, is_hf_blip2_dir
from blip2_megatron.data.processors import (
    CaptionProcessor,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QuestionProcessor,
)
from blip2_megatron.inference import Blip2Predictor

logger = logging.getLogger(__name__)

__all__ = ["export_to_hf", "load_model_and_preprocess", "load_trained_model"]


def load_model_and_preprocess(
    source: str,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    precision: str | None = None,
    quantize: str | None = None,
    **overrides: Any,
) -> tuple[Blip2Predictor, dict[str, Any], dict[str, Any]]:
    """``(model, image_processors, text_processors)`` as LAVIS returns them.

    ``model`` has ``generate`` / ``predict_answers`` (and, for a stage-1 model, retrieval
    features). ``image_processors`` / ``text_processors`` have "train" and "eval" entries.
    ``overrides`` are dotted job keys (``**{"model.llm.tp": 1}``); for a Hugging Face
    directory they are model keys (``model.`` optional, e.g. ``**{"prompt": ""}``).
    ``precision`` ("auto", "fp32", "bf16", "fp16") is the dtype generation computes in under
    autocast, as ``eval.precision``; None keeps the run's ``eval.precision`` (fp32 for a
    Hugging Face directory). ``dtype`` instead casts every weight.
    ``quantize`` ("none", "int8", "nf4") quantizes the frozen LLM's linear layers through
    bitsandbytes (``model.llm.quantize``); None keeps the source's (a Hugging Face directory
    saved quantized loads quantized).
    """
    trained_in = "fp32"
    path = Path(source)
    if quantize is not None:
        overrides = {**overrides, "model.llm.quantize": quantize}
    if path.is_dir() and is_hf_blip2_dir(path):
        module, cfg, builder = build_from_hf_blip2(path, device=device, **overrides)
        model = predictor_for(module, cfg, builder)
    else:
        override_list = [f"{k}={v}" for k, v in overrides.items()]
        if path.is_dir():
            model, job, _ = load_trained_model(str(path), None, override_list, device=device)
        else:
            try:
                load_job_config(None, [f"model.flavour={source}", *override_list])
            except ConfigError as err:
                raise ConfigError(f"{source!r} is not a directory and not a flavour: {err}") from None
            model, job, _ = load_trained_model(
                None, None, [f"model.flavour={source}", *override_list], device
            )
        cfg = job.model
        trained_in = job.train.precision
    if precision is not None:
        model.compute_dtype = accelerator.inference_dtype(precision, trained_in)
    if dtype is not None:
        if cfg.llm is not None and cfg.llm.quantize != "none":
            raise ConfigError(
                f"dtype={dtype} would cast the int8 / 4-bit weights of a quantized LLM (quantize="
                f"{cfg.llm.quantize}); use precision= for the compute dtype"
            )
        model.to(dtype)
    model.eval()
    image_size = cfg.vision.image_size
    image_processors = {"train": ImageTrainProcessor(image_size), "eval": ImageEvalProcessor(image_size)}
    text_processors = {
        "train": CaptionProcessor(),
        "eval": CaptionProcessor(),
        "question": QuestionProcessor(),
    }
    return model, image_processors, text_processors


def export_to_hf(
    out: str | Path,
    checkpoint: str | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Export a trained model (run / checkpoint directory of any layout, or a job config) for transformers.

    ``overrides`` are ``a.b=c`` job keys. Frozen parts come from the base weights the job
    names (``model.init_checkpoint``, ``model.llm.weights``), trained ones from the
    checkpoint. Run by any number of processes (TP splits the work; one rank writes).
    """
    if Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    model, job, _ = load_trained_model(checkpoint, config, list(overrides))
    if job.model.llm is None:
        raise ConfigError(
            "a stage-1 model has no LLM: transformers' Blip2ForConditionalGeneration cannot hold it"
        )
    return export_hf_blip2(
        model.module,
        out,
        tokenizer=model.tokenizer,
        overwrite=overwrite,
        qformer_tokenizer=getattr(model.builder, "qformer_tokenizer", None),
    )
