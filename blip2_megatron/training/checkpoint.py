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

Integrity and safety. ``manifest.json`` records the size and SHA-256 of every file, written
last; a resume checks it (the ranks share the hashing) and names the first damaged file.
``train.resume=auto`` then falls back to the previous complete checkpoint; an explicit
checkpoint is an error. DeepSpeed unpickles its own files without restriction, so before it
may, each is loaded with ``weights_only=True`` (DeepSpeed's few plain record types allowed):
a file holding anything else, a crafted pickle, is refused. Before a save, the free space is
checked against the size of the last checkpoint; a save that still fails (a full disk, a
lost file system) stops the job with the cause named, and the next start removes its
``.partial`` leftovers.
"""

from __future__ import annotations

import logging
import os
import pickle
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
    BEST,
    CHECKPOINTS,
    CONFIG,
    LATEST,
    MANIFEST,
    PARTIAL_SUFFIX,
    TRAINER_STATE,
    WEIGHTS,
    RunWeights,
    checkpoint_files,
    file_record,
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
from blip2_megatron.models.flops import pipeline_partition
from blip2_megatron.parallel import state
from blip2_megatron.training.faults import EXIT_SAVE_FAILED, TrainingStopped, abort_rank

logger = logging.getLogger(__name__)


class CheckpointCorruptError(CheckpointMismatchError):
    """A checkpoint file is missing, truncated or altered since it was written (the message names it)."""


class UnsafeCheckpointFileError(CheckpointMismatchError):
    """A checkpoint file would need arbitrary unpickling to load (a crafted or foreign file)."""


def checkpoint_root(job: JobConfig) -> Path:
    return Path(job.train.output_dir) / CHECKPOINTS


def layout_of(job: JobConfig, zero: int) -> dict[str, Any]:
    """The parallel layout a checkpoint's engine files belong to (with PP, what each stage holds:
    ViT blocks, bridge, decoder layers, head; ``parallel.pipeline.PipelineStage``)."""
    layout: dict[str, Any] = {"tp": job.tp, "pp": job.pp, "dp": state.dp_size(), "zero": zero}
    if job.pp > 1:
        layout["pp_stages"] = [stage.to_json() for stage in pipeline_partition(job.model, job.pp)]
    return layout


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
    """The checkpoint ``train.resume`` names ("auto": this run's newest intact one), or None.

    Collective: every rank calls it (the files are checked by all ranks together).
    """
    mode = job.train.resume
    if mode == "none":
        return None
    if mode == "auto":
        candidates = finished_checkpoints(checkpoint_root(job))
        tag = read_latest(checkpoint_root(job))
        # `latest` first (it is what a clean run left), then older ones, newest first.
        candidates.sort(key=lambda p: (p.name != tag, -_step_of(p)))
        for path in candidates:
            try:
                verify_checkpoint(path)
            except CheckpointMismatchError as err:
                logger.error("cannot resume from %s: %s; trying an older checkpoint", path, err)
                continue
            return _resume_point(job, zero, path)
        if candidates:
            raise CheckpointCorruptError(
                f"no intact checkpoint under {checkpoint_root(job)}: every one of {[p.name for p in candidates]} "
                "is damaged (see the errors above); set train.resume=none to start afresh"
            )
        return None
    path = find_checkpoint(mode)
    if path is None:
        raise FileNotFoundError(
            f"train.resume={mode!r} is neither a checkpoint nor a run with a 'latest' one"
        )
    verify_checkpoint(path)  # an explicit choice is not replaced by another checkpoint
    return _resume_point(job, zero, path)


def _step_of(path: Path) -> int:
    try:
        return int(path.name.split("_")[-1])
    except ValueError:
        return -1


def finished_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` that finished writing (renamed from ``.partial``)."""
    if not root.is_dir():
        return []
    return sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)),
        key=_step_of,
    )


def _resume_point(job: JobConfig, zero: int, path: Path) -> ResumePoint:
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
        # DeepSpeed's pipeline files hold each stage's parts: the split must be the same.
        and saved.get("pp_stages") == current.get("pp_stages")
        # ZeRO partitions the optimizer state over the DP ranks; DeepSpeed cannot re-cut it.
        and (saved.get("dp") == current["dp"] or current["zero"] == 0)
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


def clean_partial_checkpoints(job: JobConfig) -> None:
    """Remove the ``.partial`` leftovers of saves that never finished (global rank 0)."""
    root = checkpoint_root(job)
    if dist.get_rank() == 0 and root.is_dir():
        for leftover in root.glob(f"*{PARTIAL_SUFFIX}"):
            logger.warning("removing %s, left by a save that did not finish", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    dist.barrier()


# ------------------------------------------------------------------------------ integrity
def _hash_shared(checkpoint: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of ``names`` under ``checkpoint``; each rank hashes its share, all get all."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = {}
    for name in names[rank::world]:
        path = checkpoint / name
        mine[name] = file_record(path) if path.is_file() else None
    if world == 1:
        return mine
    shares: list[Any] = [None] * world
    dist.all_gather_object(shares, mine)
    return {name: entry for share in shares for name, entry in share.items()}


def write_manifest(checkpoint: Path) -> None:
    """Record every file of a finished checkpoint (collective; rank 0 writes)."""
    names = checkpoint_files(checkpoint)
    entries = _hash_shared(checkpoint, names)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json_atomic({"files": entries}, checkpoint / MANIFEST)


def verify_checkpoint(checkpoint: Path) -> None:
    """Raise :class:`CheckpointCorruptError` naming the first file that differs from the manifest.

    Then check that DeepSpeed's pickled files hold nothing but tensors and DeepSpeed's plain
    records (:class:`UnsafeCheckpointFileError` otherwise). Collective: every rank calls it.
    """
    manifest_path = checkpoint / MANIFEST
    try:
        expected = read_json(manifest_path)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointCorruptError(f"{manifest_path} is missing or unreadable ({err})") from None
    found = _hash_shared(checkpoint, sorted(expected))
    for name in sorted(expected):
        if found.get(name) is None:
            raise CheckpointCorruptError(f"{checkpoint / name} is missing")
        if found[name]["size"] != expected[name]["size"]:
            raise CheckpointCorruptError(
                f"{checkpoint / name} has {found[name]['size']} bytes, {expected[name]['size']} were written (truncated?)"
            )
        if found[name]["sha256"] != expected[name]["sha256"]:
            raise CheckpointCorruptError(
                f"{checkpoint / name} differs from what was written (its SHA-256 changed)"
            )
    check_pickles_are_plain(checkpoint)


def _deepspeed_record_types() -> list[type]:
    """The plain classes DeepSpeed pickles into its checkpoint files besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_pickles_are_plain(checkpoint: Path) -> None:
    """Refuse a checkpoint whose ``.pt`` files need arbitrary unpickling (before DeepSpeed unpickles them).

    Collective: the ranks share the files; every rank raises on the first unsafe one.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    unsafe = []
    with torch.serialization.safe_globals(_deepspeed_record_types()):
        for path in sorted(checkpoint.glob("*.pt"))[rank::world]:
            try:
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # an old-format pickle
            except pickle.UnpicklingError as err:
                unsafe.append(f"{path} (torch said: {str(err).splitlines()[0]})")
    if world > 1:
        shares: list[Any] = [None] * world
        dist.all_gather_object(shares, unsafe)
        unsafe = [entry for share in shares for entry in share]
    if unsafe:
        raise UnsafeCheckpointFileError(
            f"refused {unsafe[0]}: it holds Python objects other than tensors and DeepSpeed's plain records, so "
            "loading it would run code from the file (a crafted or foreign checkpoint?)"
        )


def read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text())


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


def _check_free_space(root: Path, job: JobConfig) -> None:
    """Stop before a save that cannot fit: the new checkpoint needs about as much as the last one."""
    previous = finished_checkpoints(root)
    fits = True
    if previous and dist.get_rank() == 0:
        needed = sum(p.stat().st_size for p in previous[-1].rglob("*") if p.is_file())
        free = shutil.disk_usage(root).free
        fits = free > 1.1 * needed
        if not fits:
            logger.error(
                "%s has %.1f MB free but a checkpoint takes %.1f MB (%s)",
                root,
                free / 2**20,
                needed / 2**20,
                previous[-1].name,
            )
    ok = accelerator.device_tensor([1.0 if fits else 0.0])
    dist.broadcast(ok, src=0)
    if not ok.item():  # every rank must know before any starts writing
        raise TrainingStopped(
            f"no room for another checkpoint in {root} (see the log); the last complete checkpoint "
            f"{previous[-1].name} and latest are intact: free space and restart to resume",
            EXIT_SAVE_FAILED,
        )


def save_checkpoint(engine: Any, job: JobConfig, step: int, trainer_state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``step`` on every rank; return its final directory.

    A write that fails on any rank (a full disk, a file system gone) stops the job on every
    rank with :class:`TrainingStopped` naming the cause; ``latest`` still names the previous
    checkpoint.
    """
    root = checkpoint_root(job)
    tag = tag_for_step(step)
    partial = root / (tag + PARTIAL_SUFFIX)
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _check_free_space(root, job)
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of a crashed save
    failure = _write_rank_files(engine, root, partial, rank)
    failed = accelerator.device_tensor([0.0 if failure is None else 1.0])
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():  # the ranks agree before anything is renamed
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        raise TrainingStopped(
            f"checkpoint {tag} could not be written: {failure or 'a write failed on another rank'}; the previous "
            f"checkpoint ({read_latest(root) or 'none'}) and latest are intact",
            EXIT_SAVE_FAILED,
        )
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
    dist.barrier()
    write_manifest(partial)
    if rank == 0:
        final = root / tag
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        partial.rename(final)
        write_text_atomic(tag, root / LATEST)
        _prune(root, job.train.keep_last)
        logger.info("saved checkpoint %s", final)
    dist.barrier()
    return root / tag


def _write_rank_files(engine: Any, root: Path, partial: Path, rank: int) -> str | None:
    """This rank's files of a checkpoint; the cause of a failure, or None.

    DeepSpeed's save runs collectives of its own: a rank whose write fails inside it cannot
    tell the others in step, so it stops at once (the launcher ends the rest); the next
    start removes the partial checkpoint. Failures in our own writes are agreed on.
    """
    if rank == 0:
        (partial / WEIGHTS).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    try:
        engine.ds.save_checkpoint(
            str(root), tag=partial.name, save_latest=False, exclude_frozen_parameters=True
        )
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as an iostream RuntimeError
        abort_rank(
            _WriteError(err, root), f"writing checkpoint {partial.name} (DeepSpeed's files)", EXIT_SAVE_FAILED
        )
    try:
        save_weights(engine, partial / WEIGHTS)
        torch.save(_rng_state(), partial / f"rng_rank{rank}.pt")
        os.sync()  # the files are on disk before `latest` may name them
    except (OSError, RuntimeError) as err:
        logger.error("rank %d could not write its part of %s: %s", rank, partial.name, err)
        return str(_WriteError(err, root))
    return None


class _WriteError(Exception):
    """A failed write, with what the file system had left (a full disk reads as an iostream error)."""

    def __init__(self, error: BaseException, root: Path):
        free = shutil.disk_usage(root).free / 2**20 if root.exists() else float("nan")
        cause = getattr(error, "strerror", None) or str(error).splitlines()[0]
        where = getattr(error, "filename", None) or root
        if free < 1:
            cause = f"No space left on device ({cause})"
        super().__init__(f"{cause} ({where}; {free:.1f} MB free)")


def _prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints; the ``best`` one stays whatever its age."""
    best = read_best(root)
    for old in finished_checkpoints(root)[:-keep_last]:
        if best is None or old.name != best["tag"]:
            shutil.rmtree(old, ignore_errors=True)


def read_best(root: Path) -> dict[str, Any] | None:
    """``{"tag", "step", "metric"}`` of the best validated checkpoint under ``root``, if any."""
    try:
        return read_json(root / BEST)
    except (OSError, ValueError):
        return None


def mark_best(checkpoint: Path, step: int, metric: float) -> None:
    """Name ``checkpoint`` as the best validated one: ``best`` beside ``latest`` (global rank 0 writes)."""
    if dist.get_rank() == 0:
        write_json_atomic({"tag": checkpoint.name, "step": step, "metric": metric}, checkpoint.parent / BEST)
        logger.info("best checkpoint: %s (agg_metric %.4f)", checkpoint.name, metric)


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
