"""Training checkpoints: DeepSpeed engine state per TP/PP rank, written crash-safe.

Layout under ``<output_dir>/checkpoints``::

    step_00000100/          one finished checkpoint (DeepSpeed files + ours)
        config.yaml         the resolved job config
        trainer_state.json  step, epoch, loader position, base weights it needs
        rng_rank{R}.pt      per-rank RNG states (torch, numpy, python, device)
    latest                  the tag of the newest finished checkpoint

A checkpoint is first written as ``step_XXXXXXXX.partial``; only when every rank has
finished is it renamed and ``latest`` replaced (write-then-rename), so a crash during a save
leaves the previous checkpoint and ``latest`` untouched. Frozen weights (ViT in stage 2,
the LLM) are excluded: ``trainer_state.json`` names the base weights they come from and
loading re-attaches nothing but the trainable state (non-strict by design, checked below).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.training.config import JobConfig, save_job_config

logger = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL_SUFFIX = ".partial"


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_root: Path) -> str | None:
    """Tag in ``latest`` if it points at a finished checkpoint directory."""
    latest = ckpt_root / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or not (ckpt_root / tag / "trainer_state.json").is_file():
        logger.warning("%s names %r, which is not a finished checkpoint; ignoring it", latest, tag)
        return None
    return tag


def resolve_resume(job: JobConfig) -> tuple[Path, str] | None:
    """(checkpoint root, tag) to resume from according to ``train.resume``, or None."""
    mode = job.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        root = Path(job.train.output_dir) / "checkpoints"
        tag = read_latest(root)
        return (root, tag) if tag else None
    path = Path(mode)
    if (path / "trainer_state.json").is_file():
        return path.parent, path.name
    tag = read_latest(path) or read_latest(path / "checkpoints")
    if tag is None:
        raise FileNotFoundError(
            f"train.resume={mode!r} is neither a checkpoint nor a folder with a 'latest' one"
        )
    root = path if (path / tag).is_dir() else path / "checkpoints"
    return root, tag


def _rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain numbers, so they load with weights_only=True."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
        **accelerator.rng_state(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state.tolist()), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    accelerator.set_rng_state(state)


def base_weights(job: JobConfig) -> dict[str, str]:
    """The files the frozen parts come from; a checkpoint is only valid on top of them."""
    model = job.model
    needed = {"init_checkpoint": model.init_checkpoint}
    if model.llm is not None:
        needed["llm"] = model.llm.weights
    return needed


def save_checkpoint(engine: Any, job: JobConfig, step: int, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``step`` on every rank; return its final directory."""
    root = Path(job.train.output_dir) / "checkpoints"
    tag = tag_for_step(step)
    partial = tag + PARTIAL_SUFFIX
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(root / partial, ignore_errors=True)  # leftovers of a crashed save
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=partial, save_latest=False, exclude_frozen_parameters=True)
    torch.save(_rng_state(), root / partial / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        state = dict(trainer_state, step=step, base_weights=base_weights(job))
        (root / partial / "trainer_state.json").write_text(json.dumps(state, indent=2))
        save_job_config(job, root / partial / "config.yaml")
        final = root / tag
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        (root / partial).rename(final)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(tag)
        tmp.replace(root / LATEST)
        _prune(root, job.train.keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    finished = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX))
    for old in finished[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine: Any, job: JobConfig, root: Path, tag: str) -> dict[str, Any]:
    """Restore engine, scheduler and RNG from ``root/tag``; return the trainer state."""
    state_path = root / tag / "trainer_state.json"
    state = json.loads(state_path.read_text())
    needed = base_weights(job)
    if state.get("base_weights") != needed:
        raise RuntimeError(
            f"checkpoint {root / tag} was trained on base weights {state.get('base_weights')} but this job "
            f"loads {needed}; point model.init_checkpoint / model.llm.weights at the same files"
        )
    # Frozen weights are not in the checkpoint by design, hence non-strict loading; the
    # trainable ones must all be there, which _check_trainable_loaded verifies.
    load_path, _ = engine.load_checkpoint(
        str(root),
        tag=tag,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    _check_trainable_loaded(engine, root / tag)
    rng_file = root / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    logger.info("resumed from %s at step %d", root / tag, state["step"])
    return state


def _check_trainable_loaded(engine: Any, ckpt_dir: Path) -> None:
    files = sorted(ckpt_dir.glob("*model_states.pt"))
    if not files:
        return
    saved = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {}
    if not saved:
        return  # ZeRO-3 keeps parameters in the optimizer files
    module = engine.module
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    missing = sorted(trainable - set(saved))
    if missing and len(files) == 1:
        raise RuntimeError(f"checkpoint {ckpt_dir} lacks trainable parameters: {missing[:10]}")
