"""The file conversions behind ``launch/convert.py`` that need no model.

* :func:`hf_to_ours`: a transformers Blip2 / InstructBlip directory -> one safetensors file
  with our names for the vision encoder, Q-Former, queries and projection
  (``query_encoder.*``, ``language_projection.*``; for ``model.init_checkpoint``) and,
  optionally, the LLM as a transformers OPT / LLaMA / Qwen2 / Mistral / T5 directory (for
  ``model.llm.weights``, which every TP rank reads shard by shard instead of loading the
  whole Blip2 file); an InstructBlip's Q-Former tokenizer goes with it, in its
  ``qformer_tokenizer`` folder (for ``model.qformer.tokenizer``).
* :func:`reshard_run`: a checkpoint of a run saved at any TP x PP -> a run directory for
  another TP x PP (its saved weights re-cut; base weights stay where the job names them).

Exporting a trained model to transformers builds the model, so it lives with the other
model-level entry points (``blip2_megatron.api.export_to_hf``). Outputs are written under a
temporary name and renamed, never left half-written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from blip2_megatron.config import ConfigError, load_job_config, save_job_config
from blip2_megatron.convert.hf_blip2 import (
    BLIP2_MODEL_TYPE,
    HF_LLM_PREFIX,
    INSTRUCTBLIP_MODEL_TYPE,
    PROJECTION_PREFIX,
    QFORMER_TOKENIZER_DIR,
    full_hf_config,
    read_hf_config,
)
from blip2_megatron.convert.run_checkpoint import (
    CHECKPOINTS,
    CONFIG,
    LATEST,
    TRAINER_STATE,
    WEIGHTS,
    find_checkpoint,
    read_trainer_state,
    reshard_weights,
    write_manifest_alone,
)
from blip2_megatron.convert.vision_qformer import hf_vision_qformer_to_ours, summarize_keys
from blip2_megatron.data.tokenizers import TOKENIZER_FILES
from blip2_megatron.io import (
    atomic_directory,
    atomic_file,
    iter_checkpoint_files,
    load_state_dict_file,
    write_json_atomic,
    write_text_atomic,
)
from blip2_megatron.models.flops import pipeline_partition
from blip2_megatron.parallel.pipeline import PipelineStage

logger = logging.getLogger(__name__)

# model_type -> the class transformers loads a Blip2's language_model.* as (FlanT5: its seq2seq model).
_LLM_ARCHITECTURES = {
    "opt": "OPTForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "t5": "T5ForConditionalGeneration",
}


def _write_llm_dir(
    out: Path, tensors: dict[str, torch.Tensor], text_config: dict[str, Any], hf_dir: Path, overwrite: bool
) -> None:
    from safetensors.torch import save_file

    if not tensors:
        raise ConfigError(f"{hf_dir} holds no language_model.* tensors")
    with atomic_directory(out, overwrite=overwrite) as partial:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(partial / "model.safetensors"),
            {"format": "pt"},
        )
        arch = _LLM_ARCHITECTURES.get(text_config.get("model_type"))
        config = {**text_config, "architectures": [arch] if arch else text_config.get("architectures")}
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, partial / name)
        if (hf_dir / QFORMER_TOKENIZER_DIR).is_dir():  # InstructBlip: for model.qformer.tokenizer
            shutil.copytree(hf_dir / QFORMER_TOKENIZER_DIR, partial / QFORMER_TOKENIZER_DIR)


def hf_to_ours(
    hf_dir: str | Path, out: str | Path, llm_out: str | Path | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Split a transformers Blip2 / InstructBlip directory into our query-encoder file (+ an LLM directory).

    Returns the number of tensors written to each output.
    """
    from safetensors.torch import save_file

    hf_dir, out = Path(hf_dir), Path(out)
    raw = read_hf_config(hf_dir)
    if raw.get("model_type") not in (BLIP2_MODEL_TYPE, INSTRUCTBLIP_MODEL_TYPE):
        raise ConfigError(
            f"{hf_dir} is not a transformers Blip2 / InstructBlip directory (model_type {raw.get('model_type')!r})"
        )
    instructblip = raw["model_type"] == INSTRUCTBLIP_MODEL_TYPE
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out} must be a .safetensors file")
    for target in (out, llm_out):
        if target is not None and Path(target).exists() and not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")

    ours: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for path in iter_checkpoint_files(hf_dir):
        tensors = load_state_dict_file(path)
        converted, rest = hf_vision_qformer_to_ours(tensors, instructblip=instructblip)
        ours.update(converted)
        for key in rest:
            if key.startswith(PROJECTION_PREFIX):
                ours[key] = tensors[key]
            elif key.startswith(HF_LLM_PREFIX):
                llm[key[len(HF_LLM_PREFIX) :]] = tensors[key]
            else:
                ignored.append(key)
    if not any(k.startswith("query_encoder.") for k in ours):
        raise ConfigError(f"{hf_dir} holds no vision_model / qformer tensors")
    if ignored:
        logger.warning("tensors with no place in our model were skipped: %s", summarize_keys(ignored))

    with atomic_file(out, overwrite=overwrite) as partial:
        save_file({k: v.contiguous() for k, v in ours.items()}, str(partial), {"format": "pt"})
    logger.info("wrote %d query-encoder / projection tensors to %s", len(ours), out)
    counts = {"ours": len(ours)}
    if llm_out is not None:
        _write_llm_dir(Path(llm_out), llm, full_hf_config(raw)["text_config"], hf_dir, overwrite)
        logger.info("wrote the %d LLM tensors to %s", len(llm), llm_out)
        counts["llm"] = len(llm)
    return counts


def reshard_run(checkpoint: str | Path, out: str | Path, tp: int, pp: int, overwrite: bool = False) -> Path:
    """Write ``checkpoint`` (a run or checkpoint directory of ours) as a run for TP = ``tp``, PP = ``pp``.

    The output is a run directory whose ``checkpoints/<tag>`` holds the saved weights cut
    for the new layout, the trainer state (step, data position) and the job config with
    the new ``model.llm.tp`` / ``model.llm.pp``; ``train.resume`` can point at it, and
    evaluation, prediction and export read it. The DeepSpeed engine files (optimizer
    moments, laid out per rank of the old layout) are not carried over: training resumed
    from a resharded checkpoint starts its Adam moments afresh (the log says so).
    Returns the new checkpoint directory.
    """
    source = find_checkpoint(checkpoint)
    if source is None:
        raise FileNotFoundError(f"{checkpoint} holds no finished checkpoint (no trainer_state.json / latest)")
    job = load_job_config(str(source / CONFIG))
    if job.model.llm is None and (tp, pp) != (1, 1):
        raise ConfigError("a stage-1 model has no LLM to split: it is always TP = PP = 1")
    if job.model.llm is not None:
        # Validates tp against the heads and pp against the layers, with errors naming them.
        job.model = dataclasses.replace(job.model, llm=dataclasses.replace(job.model.llm, tp=tp, pp=pp))
    out = Path(out)
    job.train.output_dir = str(out)
    with atomic_directory(out, overwrite=overwrite) as partial:
        target = partial / CHECKPOINTS / source.name
        if job.model.llm is not None:
            stages = pipeline_partition(job.model, pp)
        else:
            stages = [PipelineStage.whole(job.model.vision.num_layers, 0)]
        counts = reshard_weights(source / WEIGHTS, target / WEIGHTS, tp, stages)
        trainer_state = read_trainer_state(source)
        layout = {
            k: v for k, v in trainer_state.get("layout", {}).items() if k not in ("pp_layers", "pp_stages")
        }
        partition = {"pp_stages": [stage.to_json() for stage in stages]} if pp > 1 else {}
        trainer_state["layout"] = {**layout, "tp": tp, "pp": pp, **partition}
        trainer_state["resharded_from"] = str(source.resolve())
        write_json_atomic(trainer_state, target / TRAINER_STATE)
        save_job_config(job, target / CONFIG)
        # Last in the checkpoint: without it a resume (which verifies it) refuses the checkpoint.
        write_manifest_alone(target)
        save_job_config(job, partial / CONFIG)
        write_text_atomic(source.name, partial / CHECKPOINTS / LATEST)
    logger.info(
        "resharded %s to tp=%d pp=%d: %s", source, tp, pp, ", ".join(f"{k} ({v})" for k, v in counts.items())
    )
    return out / CHECKPOINTS / source.name
