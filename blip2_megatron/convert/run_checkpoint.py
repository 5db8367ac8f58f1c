"""Our run directories: where checkpoints are, and their layout-free weights (read, write, reshard).

A run directory (``train.output_dir``)::

    config.yaml                 the resolved job config
    checkpoints/
        step_00000100/          one finished checkpoint
            trainer_state.json  step, loader position, layout, base weights it needs
            config.yaml
            weights/            the model's own tensors, layout-free (below)
            ...                 the DeepSpeed engine's files (exact resume in the same layout)
        latest                  the tag of the newest finished checkpoint
        best                    which one validated best (eval.interval), never pruned

A finished checkpoint ends with ``manifest.json``, the size and SHA-256 of each of its files
(written last; a resume checks it): :func:`write_manifest_alone` writes it for checkpoints
made by one process (a resharded run), ``training.checkpoint.write_manifest`` for a run's.

``weights/`` holds every parameter that is not in a base weight file: the trained ones,
and frozen ones that were randomly initialised (no file holds them). Each (pipeline stage,
tensor-parallel rank) writes one ``pp{P}-tp{T}.safetensors`` with our whole-model names
(decoder layers by global index) and, per tensor, where its piece sits in the full tensor:
a tensor split over TP ranks is stored as each rank's slice along its partition dimension
(vocabulary padding dropped), a replicated one once. A reader assembles any slice from the
pieces, so a run saved at any TP x PP loads into any other layout, and
:func:`reshard_weights` rewrites the pieces for a target layout without building a model.
Everything is safetensors: reading a run never unpickles anything.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2_megatron.config import ConfigError
from blip2_megatron.io import CheckpointMismatchError, atomic_file, write_json_atomic
from blip2_megatron.parallel.pipeline import LLM_LAYER_NAME, PipelineStage, stage_of

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"  # {"tag", "step", "metric"} of the checkpoint with the best validation metric
PARTIAL_SUFFIX = ".partial"
TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
WEIGHTS = "weights"
MANIFEST = "manifest.json"
_PIECES_KEY = "blip2_megatron.pieces"  # safetensors metadata: per tensor, where the piece goes
TIED_EMBEDDING = "language_model.embed_tokens.weight"
TIED_HEAD = "language_model.lm_head.weight"
VOCAB_PARAMS = (TIED_EMBEDDING, TIED_HEAD)


# ------------------------------------------------------------------------------ discovery
def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_root: Path) -> str | None:
    """Tag in ``ckpt_root/latest`` if it names a finished checkpoint directory."""
    latest = Path(ckpt_root) / LATEST
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or not (Path(ckpt_root) / tag / TRAINER_STATE).is_file():
        logger.warning("%s names %r, which is not a finished checkpoint; ignoring it", latest, tag)
        return None
    return tag


def find_checkpoint(path: str | Path) -> Path | None:
    """The finished checkpoint ``path`` names: a checkpoint, a ``checkpoints/`` folder or a run."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        return path
    for root in (path / CHECKPOINTS, path):
        tag = read_latest(root)
        if tag:
            return root / tag
    return None


def is_run_or_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and find_checkpoint(path) is not None


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory holding ``checkpoint`` (``<run>/checkpoints/<tag>``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else checkpoint.parent


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    path = Path(checkpoint) / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointMismatchError(f"{path} is unreadable: {err}") from None


# ------------------------------------------------------------------------------ names
def unwrap_stage(module: nn.Module) -> nn.Module:
    """The BLIP-2 model inside a pipeline stage wrapper (or the module itself)."""
    inner = getattr(module, "model", None)
    return inner if isinstance(inner, nn.Module) and hasattr(module, "placeholders") else module


def global_names(model: nn.Module) -> dict[str, str]:
    """Parameter names of ``model`` (a whole model or one pipeline stage) -> whole-model names.

    Decoder layers are numbered by global index (a stage's ``layers.0`` may be layer 16); the
    last stage's copy of a tied head is the token embedding it copies.
    """
    lm = getattr(model, "language_model", None)
    names: dict[str, str] = {}
    for name, _ in model.named_parameters():
        match = LLM_LAYER_NAME.match(name)
        if match and lm is not None:
            names[name] = (
                f"language_model.layers.{lm.layers[int(match.group(1))].layer_index}.{match.group(2)}"
            )
        elif is_tied_copy(model, name):
            names[name] = TIED_EMBEDDING
        else:
            names[name] = name
    return names


def is_tied_copy(model: nn.Module, local_name: str) -> bool:
    """Whether ``local_name`` is a stage's copy of a weight another stage owns (not saved twice)."""
    lm = getattr(model, "language_model", None)
    return local_name == TIED_HEAD and lm is not None and lm.holds_tied_head_copy


def partition_dim(param: torch.Tensor) -> int | None:
    """The tensor-parallel split dimension of a parameter (megatron-core's mark), or None."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


# ------------------------------------------------------------------------------ writing
@dataclass
class Piece:
    """One stored piece: rows ``[start, start + local)`` of the full tensor along ``dim``."""

    full_shape: tuple[int, ...]
    dim: int | None
    start: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.full_shape), "dim": self.dim, "start": self.start}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Piece:
        return cls(tuple(data["shape"]), data["dim"], int(data["start"]))


def local_pieces(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], tp_rank: int, tp_size: int, vocab_size: int | None
) -> dict[str, tuple[torch.Tensor, Piece]]:
    """This rank's pieces of ``tensors`` (local names of ``model``) under whole-model names.

    A TP-split tensor gives its slice (vocabulary padding rows dropped); a replicated one
    is kept by TP rank 0 only.
    """
    names = global_names(model)
    params = dict(model.named_parameters())
    pieces: dict[str, tuple[torch.Tensor, Piece]] = {}
    for local_name, tensor in tensors.items():
        name = names[local_name]
        dim = partition_dim(params[local_name])
        if dim is None:
            if tp_rank == 0:
                pieces[name] = (tensor, Piece(tuple(tensor.shape), None))
            continue
        local = tensor.shape[dim]
        full = local * tp_size
        if name in VOCAB_PARAMS and vocab_size is not None:
            full = vocab_size
        start = tp_rank * local
        keep = max(min(local, full - start), 0)
        if keep == 0:
            continue  # this rank's rows are all vocabulary padding
        shape = list(tensor.shape)
        shape[dim] = full
        pieces[name] = (tensor.narrow(dim, 0, keep), Piece(tuple(shape), dim, start))
    return pieces


def checkpoint_files(checkpoint: Path) -> list[str]:
    """The files of a checkpoint that its manifest records (relative names, sorted)."""
    checkpoint = Path(checkpoint)
    return sorted(
        str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def file_record(path: Path) -> dict[str, Any]:
    """A file's manifest entry: ``{"size", "sha256"}``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(16 << 20):
            digest.update(chunk)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


def write_manifest_alone(checkpoint: Path) -> Path:
    """Write ``checkpoint``'s ``manifest.json`` from one process: ``{"files": {name: {size, sha256}}}``.

    The same record the training checkpoint writes (its ranks share the hashing), so that a
    checkpoint made without training (a resharded run) passes the check a resume makes.
    """
    checkpoint = Path(checkpoint)
    files = {name: file_record(checkpoint / name) for name in checkpoint_files(checkpoint)}
    return write_json_atomic({"files": files}, checkpoint / MANIFEST)


def write_pieces(path: Path, pieces: Mapping[str, tuple[torch.Tensor, Piece]]) -> Path:
    """Write pieces as one safetensors file (atomically) with their placement in the metadata."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu").contiguous() for name, (tensor, _) in pieces.items()}
    placement = {name: piece.to_json() for name, (_, piece) in pieces.items()}
    with atomic_file(path) as partial:
        save_file(tensors, str(partial), {_PIECES_KEY: json.dumps(placement), "format": "pt"})
    return path


def pieces_file_name(pp_rank: int, tp_rank: int) -> str:
    return f"pp{pp_rank:02d}-tp{tp_rank:02d}.safetensors"


# ------------------------------------------------------------------------------ reading
class RunWeights:
    """The layout-free weights of one checkpoint, read piece by piece (lazily, no unpickling)."""

    def __init__(self, weights_dir: str | Path):
        from safetensors import safe_open

        self.path = Path(weights_dir)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path} holds no weight files (*.safetensors)")
        self._pieces: dict[str, list[tuple[Any, Piece]]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                placement = json.loads((handle.metadata() or {})[_PIECES_KEY])
            except Exception as err:  # noqa: BLE001 - any damage to the file is reported the same way
                raise CheckpointMismatchError(
                    f"{file} is not a readable weights file of ours: {err}"
                ) from None
            for name, info in placement.items():
                self._pieces.setdefault(name, []).append((handle, Piece.from_json(info)))
                if name not in handle.keys():
                    raise CheckpointMismatchError(f"{file}: metadata names {name} but the file lacks it")

    def keys(self) -> list[str]:
        return sorted(self._pieces)

    def __contains__(self, name: str) -> bool:
        return name in self._pieces

    def full_shape(self, name: str) -> tuple[int, ...]:
        return self._pieces[name][0][1].full_shape

    def partition_dim(self, name: str) -> int | None:
        return self._pieces[name][0][1].dim

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` of the full tensor along its partition dim (all of it if replicated).

        Rows past the stored extent (vocabulary padding of a larger TP size) are zeros.
        """
        pieces = self._pieces[name]
        first = pieces[0][1]
        if first.dim is None:
            return pieces[0][0].get_tensor(name)
        dim = first.dim
        stop = first.full_shape[dim] if stop is None else stop
        shape = list(first.full_shape)
        shape[dim] = stop - start
        out = torch.zeros(shape, dtype=_stored_dtype(pieces[0][0], name))
        covered = 0
        for handle, piece in pieces:
            piece_slice = handle.get_slice(name)
            piece_rows = piece_slice.get_shape()[dim]
            lo, hi = max(start, piece.start), min(stop, piece.start + piece_rows)
            if lo >= hi:
                continue
            index = (slice(None),) * dim + (slice(lo - piece.start, hi - piece.start),)
            out.narrow(dim, lo - start, hi - lo).copy_(piece_slice[index])
            covered += hi - lo
        expected = max(min(stop, first.full_shape[dim]) - start, 0)
        if covered != expected:
            raise CheckpointMismatchError(
                f"{self.path}: the pieces of {name} cover {covered} of rows {start}-{stop} (expected {expected}); "
                "a weights file of the checkpoint is missing"
            )
        return out

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor whole, one at a time."""
        for name in self.keys():
            yield name, self.read(name)


def _stored_dtype(handle: Any, name: str) -> torch.dtype:
    """The dtype of a stored tensor, from one element of it."""
    piece = handle.get_slice(name)
    return piece[tuple(slice(0, 1) for _ in piece.get_shape())].dtype


@torch.no_grad()
def load_run_weights(
    model: nn.Module,
    weights_dir: str | Path,
    tp_rank: int,
    tp_size: int,
    required: Iterable[str] = (),
    prefix: str = "",
) -> list[str]:
    """Copy the slices this rank needs from a checkpoint's ``weights/`` into ``model``.

    ``model`` is a whole model or one pipeline stage of any TP size. ``required`` are local
    parameter names that must be in the checkpoint (the trainable ones): a missing one, a
    checkpoint tensor the whole model has no place for, or a wrong shape raises
    :class:`CheckpointMismatchError` naming the tensor. ``prefix``: only tensors whose
    (whole-model) name starts with it are considered. Returns the local names loaded.
    """
    weights = RunWeights(weights_dir)
    names = {local: name for local, name in global_names(model).items() if name.startswith(prefix)}
    params = dict(model.named_parameters())
    missing = sorted(set(required) - {local for local, name in names.items() if name in weights})
    if missing:
        raise CheckpointMismatchError(
            f"{weights.path}: {len(missing)} trained tensors the model needs are missing: {missing[:10]}"
        )
    if _holds_whole_model(model):
        unexpected = sorted({k for k in weights.keys() if k.startswith(prefix)} - set(names.values()))
        if unexpected:
            raise CheckpointMismatchError(
                f"{weights.path}: {len(unexpected)} tensors have no place in the model: {unexpected[:10]} "
                "(a checkpoint of another model kind or size?)"
            )
    vocab = getattr(getattr(model, "language_model", None), "vocab_size", None)
    loaded = []
    for local_name, name in names.items():
        if name not in weights:
            continue
        param = params[local_name]
        dim = partition_dim(param)
        full = weights.full_shape(name)
        if dim is None:
            _check_shape(weights, name, full, tuple(param.shape))
            param.copy_(weights.read(name))
        else:
            expected = list(param.shape)
            expected[dim] = vocab if name in VOCAB_PARAMS else param.shape[dim] * tp_size
            _check_shape(weights, name, full, tuple(expected))
            local = param.shape[dim]
            param.copy_(weights.read(name, tp_rank * local, (tp_rank + 1) * local))
        loaded.append(local_name)
    logger.info("loaded %d tensors from %s", len(loaded), weights.path)
    return loaded


def _holds_whole_model(model: nn.Module) -> bool:
    whole = getattr(model, "holds_whole_model", None)
    return True if whole is None else bool(whole)


def _check_shape(weights: RunWeights, name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(found) != tuple(expected):
        raise CheckpointMismatchError(
            f"{weights.path}: {name} has shape {tuple(found)} but the model needs {tuple(expected)}"
        )


# ------------------------------------------------------------------------------ resharding
def reshard_weights(src: str | Path, dst: str | Path, tp: int, stages: list[PipelineStage]) -> dict[str, int]:
    """Rewrite a checkpoint's ``weights/`` for ``tp`` ranks and the pipeline ``stages``.

    Works on the files alone (no model, no process group). Returns tensors written per file.
    """
    weights = RunWeights(src)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    files: dict[tuple[int, int], dict[str, tuple[torch.Tensor, Piece]]] = {}
    for name in weights.keys():
        stage = stage_of(name, stages)
        full = weights.full_shape(name)
        dim = weights.partition_dim(name)
        if dim is None:
            files.setdefault((stage, 0), {})[name] = (weights.read(name), Piece(full, None))
            continue
        rows = full[dim]
        local = -(-rows // tp)  # ceil: vocabulary rows are padded to a multiple of tp
        if name not in VOCAB_PARAMS and rows % tp:
            raise ConfigError(f"{name}: {rows} rows along dim {dim} do not split over tp={tp}")
        for rank in range(tp):
            start = rank * local
            stop = min(start + local, rows)
            if start < stop:
                files.setdefault((stage, rank), {})[name] = (
                    weights.read(name, start, stop),
                    Piece(full, dim, start),
                )
    counts = {}
    for (stage, rank), pieces in sorted(files.items()):
        path = write_pieces(dst / pieces_file_name(stage, rank), pieces)
        counts[path.name] = len(pieces)
    return counts
