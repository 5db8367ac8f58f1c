"""The weight conversions behind ``launch/convert.py``.

* :func:`hf_to_ours`: a transformers Blip2 directory -> one safetensors file with our
  names for the vision encoder, Q-Former, queries and projection (``query_encoder.*``,
  ``language_projection.*``; for ``model.init_checkpoint``) and, optionally, the LLM as a
  transformers OPT / LLaMA directory (for ``model.llm.weights``, which every TP rank reads
  shard by shard instead of loading the whole Blip2 file).
* :func:`ours_to_hf`: a training run / checkpoint (or a job config) -> a transformers
  Blip2 directory.

Outputs are written under a temporary name and renamed, never left half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from blip2_megatron.config_utils import ConfigError
from blip2_megatron.convert.hf_blip2 import (
    HF_LLM_PREFIX,
    PROJECTION_PREFIX,
    TOKENIZER_FILES,
    export_hf_blip2,
    full_hf_config,
    read_hf_config,
)
from blip2_megatron.convert.io import iter_checkpoint_files, load_state_dict_file
from blip2_megatron.convert.vision_qformer import hf_vision_qformer_to_ours, summarize_keys

logger = logging.getLogger(__name__)


def _partial(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{os.getpid()}")


def _check_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")


def _replace(partial: Path, target: Path) -> None:
    """Move a finished ``partial`` file or directory to ``target`` (replacing what is there)."""
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    partial.rename(target)


def _write_llm_dir(
    out: Path, tensors: dict[str, torch.Tensor], text_config: dict[str, Any], hf_dir: Path
) -> None:
    import json

    from safetensors.torch import save_file

    if not tensors:
        raise ConfigError(f"{hf_dir} holds no language_model.* tensors")
    partial = _partial(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(partial / "model.safetensors"),
            {"format": "pt"},
        )
        arch = {"opt": "OPTForCausalLM", "llama": "LlamaForCausalLM"}.get(text_config.get("model_type"))
        config = {**text_config, "architectures": [arch] if arch else text_config.get("architectures")}
        (partial / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in TOKENIZER_FILES:
            if (hf_dir / name).is_file():
                shutil.copy2(hf_dir / name, partial / name)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def hf_to_ours(
    hf_dir: str | Path, out: str | Path, llm_out: str | Path | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Split a transformers Blip2 directory into our query-encoder file (+ an LLM directory).

    Returns the number of tensors written to each output.
    """
    from safetensors.torch import save_file

    hf_dir, out = Path(hf_dir), Path(out)
    raw = read_hf_config(hf_dir)
    if raw.get("model_type") != "blip-2":
        raise ConfigError(
            f"{hf_dir} is not a transformers Blip2 directory (model_type {raw.get('model_type')!r})"
        )
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out {out} must be a .safetensors file")
    _check_free(out, overwrite)
    if llm_out is not None:
        _check_free(Path(llm_out), overwrite)

    ours: dict[str, torch.Tensor] = {}
    llm: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for path in iter_checkpoint_files(hf_dir):
        tensors = load_state_dict_file(path)
        converted, rest = hf_vision_qformer_to_ours(tensors)
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

    partial = _partial(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_file({k: v.contiguous() for k, v in ours.items()}, str(partial), {"format": "pt"})
        _replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    logger.info("wrote %d query-encoder / projection tensors to %s", len(ours), out)
    counts = {"ours": len(ours)}
    if llm_out is not None:
        _write_llm_dir(Path(llm_out), llm, full_hf_config(raw)["text_config"], hf_dir)
        logger.info("wrote the %d LLM tensors to %s", len(llm), llm_out)
        counts["llm"] = len(llm)
    return counts


def ours_to_hf(
    out: str | Path,
    checkpoint: str | None = None,
    config: str | None = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Export a trained model (run / checkpoint directory, or a job config) as a transformers Blip2 directory.

    ``overrides`` are ``a.b=c`` job keys (``model.llm.tp=1`` ...). Frozen parts come from the
    base weights the job names (``model.init_checkpoint``, ``model.llm.weights``), trained
    ones from the checkpoint. A TP > 1 run is exported by the same number of processes.
    """
    from blip2_megatron.api import load_trained_model

    _check_free(Path(out), overwrite)
    model, job, _ = load_trained_model(checkpoint, config, list(overrides))
    if job.model.llm is None:
        raise ConfigError(
            "a stage-1 model has no LLM: transformers' Blip2ForConditionalGeneration cannot hold it"
        )
    return export_hf_blip2(model, out, tokenizer=model.tokenizer, overwrite=overwrite)
