"""Training checkpoints: save, find, resume, crash-safe (run layout: ``convert/run_checkpoint.py``).

A checkpoint holds, per step:

* ``weights/``: the model's own tensors in the layout-free form every reader uses
  (evaluation, prediction, export, resharding, the next stage's initial weights): the
  trained parameters and any randomly initialised frozen ones, safetensors only;
* the DeepSpeed engine's files (optimizer moments, fp32 masters, loss scale) for an exact
  resume in the same TP x PP layout and ZeRO stage;
* ``trainer_state.json`` (step, loader position, schedule, layout, base weights it needs),
  ``config.yaml`` and per-rank RNG states (``rng_rank{R}.pt``, loadable with
  ``weights_only=True``).

A checkpoint is first written as ``step_XXXXXXXX.partial``; only when every rank has
finished is it renamed and ``latest`` replaced (write-then-rename), so a crash during a save
leaves the previous checkpoint and ``latest`` untouched. Frozen weights that come from files
are not stored: ``trainer_state.json`` names the files, and resuming checks they are the same.

Resuming in another layout (a run resharded with ``launch/convert.py reshard``, or the same
checkpoint with another ``model.llm.tp`` / ``pp``) starts from ``weights/``: the model is
built with them before DeepSpeed wraps it, step, schedule and data position are restored,
and the Adam moments start afresh (logged).
"""

from __future__ import annotations

import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.config import JobConfig, save_job_config
from blip2_megatron.convert.run_checkpoint import (
    CHECKPOINTS,
    CONFIG,
    LATEST,
    PARTIAL_SUFFIX,
    TRAINER_STATE,
    WEIGHTS,
    RunWeights,
    find_checkpoint,
    global_names,
    is_tied_copy,
    local_pieces,
    pieces_file_name,
    read_latest,
    read_trainer_state,
    tag_for_step,
    write_pieces,
)
from blip2_megatron.io import CheckpointMismatchError, write_json_atomic, write_text_atomic
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)


def checkpoint_root(job: JobConfig) -> Path:
    return Path(job.train.output_dir) / CHECKPOINTS


def layout_of(job: JobConfig, zero: int) -> dict[str, int]:
    """The parallel layout a checkpoint's engine files belong to."""
    return {"tp": job.tp, "pp": job.pp, "dp": state.dp_size(), "zero": zero}


def base_weights(job: JobConfig) -> dict[str, str]:
    """The files the frozen parts come from; a checkpoint is only valid on top of them."""
    model = job.model
    needed = {"init_checkpoint": model.init_checkpoint}
    if model.llm is not None:
        needed["llm"] = model.llm.weights
    return needed


# ------------------------------------------------------------------------------ finding
@dataclass
class ResumePoint:
    """A checkpoint to resume from, and whether its engine files fit this job's layout."""

    path: Path
    trainer_state: dict[str, Any]
    engine_files_fit: bool

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])


def resolve_resume(job: JobConfig, zero: int) -> ResumePoint | None:
    """The checkpoint ``train.resume`` names ("auto": this run's ``latest``), or None."""
    mode = job.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        root = checkpoint_root(job)
        tag = read_latest(root)
        if tag is None:
            return None
        path = root / tag
    else:
        path = find_checkpoint(mode)
        if path is None:
            raise FileNotFoundError(
                f"train.resume={mode!r} is neither a checkpoint nor a run with a 'latest' one"
            )
    trainer_state = read_trainer_state(path)
    needed = base_weights(job)
    if trainer_state.get("base_weights") != needed:
        raise CheckpointMismatchError(
            f"checkpoint {path} was trained on base weights {trainer_state.get('base_weights')} but this job "
            f"loads {needed}; point model.init_checkpoint / model.llm.weights at the same files"
        )
    saved = trainer_state.get("layout") or {}
    current = layout_of(job, zero)
    fits = (
        saved.get("tp") == current["tp"]
        and saved.get("pp") == current["pp"]
        and saved.get("zero") == current["zero"]
        and any(path.glob("*model_states.pt"))
    )
    if not fits:
        logger.warning(
            "checkpoint %s was saved with layout %s and this job runs %s: resuming from its saved weights "
            "(step, schedule and data position restored; the optimizer's moments start afresh)",
            path,
            saved,
            current,
        )
    return ResumePoint(path, trainer_state, fits)


# ------------------------------------------------------------------------------ saving
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


def _set_rng_state(saved: dict[str, Any]) -> None:
    py_version, py_state, py_gauss = saved["python"]
    random.setstate((py_version, tuple(py_state.tolist()), py_gauss))
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = saved["numpy"]
    np.random.set_state((np_kind, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(saved["torch"])
    accelerator.set_rng_state(saved)


def saved_parameter_names(model: torch.nn.Module) -> list[str]:
    """Parameters a checkpoint stores: the trained ones and those no base weight file holds.

    A stage's copy of a tied weight is left to the stage that owns it.
    """
    from_files = getattr(model, "base_weight_names", frozenset())
    return [
        n
        for n, p in model.named_parameters()
        if (p.requires_grad or n not in from_files) and not is_tied_copy(model, n)
    ]


def save_weights(engine: Any, folder: Path) -> None:
    """This rank's pieces of the saved parameters into ``folder`` (collective over DP under ZeRO-3)."""
    model = engine.model
    names = saved_parameter_names(model)
    with engine.gathered_parameters(names):
        if state.dp_rank() != 0:
            return
        params = dict(model.named_parameters())
        vocab = getattr(getattr(model, "language_model", None), "vocab_size", None)
        pieces = local_pieces(
            model, {n: params[n].detach() for n in names}, state.tp_rank(), state.tp_size(), vocab
        )
        if pieces:
            write_pieces(folder / pieces_file_name(state.pp_rank(), state.tp_rank()), pieces)


def save_checkpoint(engine: Any, job: JobConfig, step: int, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``step`` on every rank; return its final directory."""
    root = checkpoint_root(job)
    tag = tag_for_step(step)
    partial = root / (tag + PARTIAL_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
        (partial / WEIGHTS).mkdir(parents=True)
    dist.barrier()
    engine.ds.save_checkpoint(str(root), tag=partial.name, save_latest=False, exclude_frozen_parameters=True)
    save_weights(engine, partial / WEIGHTS)
    torch.save(_rng_state(), partial / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        full_state = dict(
            trainer_state,
            step=step,
            base_weights=base_weights(job),
            layout=layout_of(job, engine.zero_stage),
            scheduler=engine.scheduler.state_dict(),
        )
        write_json_atomic(full_state, partial / TRAINER_STATE)
        save_job_config(job, partial / CONFIG)
        final = root / tag
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        partial.rename(final)
        write_text_atomic(tag, root / LATEST)
        _prune(root, job.train.keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    finished = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX))
    for old in finished[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ resuming
def restore(engine: Any, point: ResumePoint) -> dict[str, Any]:
    """Bring the engine to the state of ``point``; return its trainer state.

    With fitting engine files: DeepSpeed restores weights, optimizer and schedule exactly.
    Otherwise the weights were loaded when the model was built (``build_engine(trained=)``)
    and only the schedule is restored here.
    """
    path = point.path
    if point.engine_files_fit:
        # Frozen weights are not in the engine files by design, hence non-strict loading;
        # the trained ones must all be there, which the check below verifies.
        load_path, _ = engine.ds.load_checkpoint(
            str(path.parent),
            tag=path.name,
            load_module_strict=False,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
        if load_path is None:
            raise CheckpointMismatchError(f"DeepSpeed could not load checkpoint {path}")
        _check_weights_cover_trained(engine.model, path)
    elif "scheduler" in point.trainer_state:
        engine.scheduler.load_state_dict(point.trainer_state["scheduler"])
    rng_file = path / f"rng_rank{dist.get_rank()}.pt"
    if point.engine_files_fit and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=True))
    logger.info("resumed from %s at step %d", path, point.step)
    return point.trainer_state


def _check_weights_cover_trained(model: torch.nn.Module, checkpoint: Path) -> None:
    """Every trained parameter of this rank is in the checkpoint's saved weights (names only)."""
    saved = set(RunWeights(checkpoint / WEIGHTS).keys())
    names = global_names(model)
    missing = sorted(
        names[n] for n, p in model.named_parameters() if p.requires_grad and names[n] not in saved
    )
    if missing:
        raise CheckpointMismatchError(f"checkpoint {checkpoint} lacks trained parameters: {missing[:10]}")
