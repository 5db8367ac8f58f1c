"""Reading weight files safely: safetensors, or ``torch.load(..., weights_only=True)``.

Every converter reads checkpoints through this module, so there is one place that
decides what a weight file may contain. A ``.pth`` / ``.bin`` file is unpickled with
``weights_only=True`` (tensors, dicts, lists and plain numbers only); a file that needs
arbitrary unpickling is refused with an error naming it, never loaded "just this once",
because unpickling a downloaded file can run any code in it.
"""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIX = ".safetensors"

# Training checkpoints wrap the weights: LAVIS saves {"model": ..., "optimizer": ...},
# others use "state_dict" or "module" (DeepSpeed). Tried in this order.
_WRAPPER_KEYS = ("model", "state_dict", "module")


class UnsafeCheckpointError(RuntimeError):
    """A weight file that cannot be read without arbitrary unpickling."""


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
