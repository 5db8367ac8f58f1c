"""Inference entry points in LAVIS's spirit: ``load_model_and_preprocess`` and friends.

``source`` may be a local Hugging Face Blip2 directory (weights, tokenizer and image
processor files), a training run or checkpoint directory of ours, or a flavour name
(random weights unless overrides name weight files).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from blip2_megatron import accelerator
from blip2_megatron.config_utils import ConfigError
from blip2_megatron.data.processors import (
    CaptionProcessor,
    ImageEvalProcessor,
    ImageTrainProcessor,
    QuestionProcessor,
)
from blip2_megatron.parallel import state
from blip2_megatron.training.config import JobConfig, load_job_config

logger = logging.getLogger(__name__)


def _checkpoint_dir(path: Path) -> Path | None:
    """A finished checkpoint directory inside ``path`` (run dir, checkpoints/ dir, or itself)."""
    from blip2_megatron.training.checkpoint import read_latest

    if (path / "trainer_state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        tag = read_latest(root)
        if tag:
            return root / tag
    return None


def _load_trainable_state(model: torch.nn.Module, ckpt: Path) -> None:
    """Copy the trainable weights of a DeepSpeed checkpoint (TP rank of this process) into ``model``."""
    rank = state.tp_rank() if state.is_initialized() else 0
    candidates = sorted(ckpt.glob(f"mp_rank_{rank:02d}_model_states.pt")) or sorted(
        ckpt.glob("*model_states.pt")
    )
    if not candidates:
        raise FileNotFoundError(f"no model_states file in checkpoint {ckpt}")
    # DeepSpeed's model-state file carries a few plain Python objects besides tensors; it is
    # a file this project wrote, not a downloaded one.
    saved = torch.load(candidates[0], map_location="cpu", weights_only=False)["module"]
    missing, unexpected = model.load_state_dict(saved, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = sorted(trainable & set(missing))
    if lost or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt} does not match the model: missing trainable {lost[:10]}, unexpected {unexpected[:10]}"
        )
    logger.info("loaded %d trained tensors from %s", len(saved), ckpt)


def load_trained_model(
    checkpoint: str | None, config: str | None = None, overrides: list[str] | None = None
) -> tuple[torch.nn.Module, JobConfig, Path | None]:
    """(model in eval mode, job config, run dir) from a run/checkpoint directory or a job config."""
    from blip2_megatron.models.factory import build_model

    ckpt = None
    run_dir = None
    if checkpoint:
        ckpt = _checkpoint_dir(Path(checkpoint))
        if ckpt is None:
            raise FileNotFoundError(
                f"{checkpoint} holds no finished checkpoint (no trainer_state.json / latest)"
            )
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        config = config or str(ckpt / "config.yaml")
    job = load_job_config(config, overrides or [])
    state.initialize_model_parallel(job.tp, 1)
    model = build_model(job.model, device=accelerator.current_device())
    if ckpt is not None:
        _load_trainable_state(model, ckpt)
    model.eval()
    return model, job, run_dir


def _is_hf_blip2_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    return json.loads((path / "config.json").read_text()).get("model_type") == "blip-2"


def load_model_and_preprocess(
    source: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **overrides: Any
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """``(model, image_processors, text_processors)`` as LAVIS returns them.

    ``image_processors`` / ``text_processors`` have "train" and "eval" entries.
    ``overrides`` are dotted job keys (``**{"model.llm.tp": 1}``); for a Hugging Face
    directory they are model keys (``model.`` optional, e.g. ``**{"prompt": ""}``).
    """
    path = Path(source)
    override_list = [f"{k}={v}" for k, v in overrides.items()]
    if path.is_dir() and _is_hf_blip2_dir(path):
        from blip2_megatron.convert.hf_blip2 import load_hf_blip2

        model, cfg = load_hf_blip2(
            path, device=accelerator.current_device() if device is None else device, **overrides
        )
        image_size = cfg.vision.image_size
    elif path.is_dir():
        model, job, _ = load_trained_model(str(path), None, override_list)
        image_size = job.model.vision.image_size
    else:
        try:
            job = load_job_config(None, [f"model.flavour={source}", *override_list])
        except ConfigError as err:
            raise ConfigError(f"{source!r} is not a directory and not a flavour: {err}") from None
        model, job, _ = load_trained_model(None, None, [f"model.flavour={source}", *override_list])
        image_size = job.model.vision.image_size
    if device is not None:
        model.to(device)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    image_processors = {"train": ImageTrainProcessor(image_size), "eval": ImageEvalProcessor(image_size)}
    text_processors = {
        "train": CaptionProcessor(),
        "eval": CaptionProcessor(),
        "question": QuestionProcessor(),
    }
    return model, image_processors, text_processors
