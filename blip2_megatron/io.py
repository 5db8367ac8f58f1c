"""Files in and out, in one place: safe loads and atomic writes.

Reading weights: safetensors, or ``torch.load(..., weights_only=True)`` (tensors, dicts,
lists and plain numbers only). A file that needs arbitrary unpickling is refused with an
error naming it, never loaded "just this once", because unpickling a downloaded file can
run any code in it. YAML is read with the safe loader.

Writing: every file or directory this project produces is written under a temporary
name in the same folder and renamed into place, so a crash, a pre-emption or a full disk
leaves either the previous version or the complete new one, never a truncated file:
:func:`write_text_atomic`, :func:`write_json_atomic`, :func:`atomic_file` (a path to hand
to a writer such as ``safetensors.save_file``) and :func:`atomic_directory`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"

# Training checkpoints wrap the weights: LAVIS saves {"model": ..., "optimizer": ...},
# others use "state_dict" or "module" (DeepSpeed). Tried in this order.
_WRAPPER_KEYS = ("model", "state_dict", "module")


class UnsafeCheckpointError(RuntimeError):
    """A weight file that cannot be read without arbitrary unpickling."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: missing, unexpected or wrongly shaped tensors, by name."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of one weight file (on CPU), keyed by name.

    ``.safetensors`` files are read with safetensors; anything else (``.pth``, ``.bin``,
    ``.pt``) with ``torch.load(path, map_location="cpu", weights_only=True)``. A training
    checkpoint that wraps its weights under "model" / "state_dict" / "module" (LAVIS,
    DeepSpeed) is unwrapped. Non-tensor entries next to the weights are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refused to load {path}: it holds Python objects other than tensors and plain containers, "
            "so reading it needs arbitrary unpickling, which can run code from the file. "
            "Re-save its state dict with torch.save(model.state_dict(), ...) or as .safetensors "
            f"on a machine where you trust the file. (torch said: {str(err).splitlines()[0]})"
        ) from err
    return _tensors_of(obj, path)


def _tensors_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The flat name -> tensor mapping inside a loaded checkpoint object."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a mapping of tensor names to tensors")
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                logger.info("%s: using the weights under %r", path, key)
                return _tensors_of(obj[key], path)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{path} contains no tensors (top-level keys: {sorted(map(str, obj))[:10]})")
    dropped = sorted(str(k) for k in obj if k not in tensors)
    if dropped:
        logger.info("%s: ignoring %d non-tensor entries: %s", path, len(dropped), dropped[:10])
    return tensors


def iter_checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a Hugging Face model directory, in a stable order.

    Prefers safetensors over ``pytorch_model*.bin``; when an index json exists
    (``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``) exactly the
    shards it names are returned, and a missing shard is an error naming it.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = model_dir / index_name
        if index_path.is_file():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
            return files
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"no weights in {model_dir}: expected *.safetensors or pytorch_model*.bin (optionally with an index json)"
    )


def read_yaml(path: str | Path) -> Any:
    """The YAML document at ``path``, read with the safe loader (no Python objects)."""
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# ----------------------------------------------------------------------------- writing


def partial_path(target: str | Path) -> Path:
    """A hidden temporary name next to ``target``, unique per process."""
    target = Path(target)
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_path(partial: Path, target: Path) -> None:
    """Move a finished file or directory to ``target``, replacing what is there.

    A directory being replaced is first renamed aside, so ``target`` is never missing
    half-way through (only for the instant between two renames).
    """
    partial, target = Path(partial), Path(target)
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)
        target.rename(old)
        partial.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, target)
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_file(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``target``'s content to; renamed into place on success.

    On any error the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    _remove(partial)
    try:
        yield partial
        replace_path(partial, target)
    except BaseException:
        _remove(partial)
        raise


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; it becomes ``target`` on success.

    On any error the temporary directory is removed and ``target`` is untouched.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    partial = partial_path(target)
    _remove(partial)
    partial.mkdir(parents=True)
    try:
        yield partial
        replace_path(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write ``data`` to ``path`` through a temporary file, fsync and an atomic rename."""
    path = Path(path)
    with atomic_file(path) as partial:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return path


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    return write_bytes_atomic(text.encode("utf-8"), path)


def json_ready(value: Any) -> Any:
    """``value`` with tensors / numpy values as lists and non-finite floats as ``None``.

    ``json.dump`` would otherwise fail on tensors and write ``NaN`` / ``Infinity``, which
    strict JSON readers (and most dashboards) reject.
    """
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):
        return json_ready(value.tolist())  # numpy / torch scalars and arrays
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(data: Any, path: str | Path, indent: int | None = 2) -> Path:
    """Write ``data`` as JSON (see :func:`json_ready`) to ``path`` atomically; parents are created."""
    text = json.dumps(json_ready(data), indent=indent, ensure_ascii=False) + "\n"
    return write_text_atomic(text, path)
