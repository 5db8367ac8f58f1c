"""launch/train.py with every torch.distributed collective recorded: (operation, dtype) per call.

    BLIP2_COLLECTIVES_DIR=/tmp/probe deepspeed --num_gpus 2 tests/scripts/collective_probe.py <launch/train.py arguments>

Each rank writes ``rank{R}.json`` (the distinct operation/dtype pairs it issued, with
counts) when it exits. DeepSpeed's communication layer and megatron-core both call
``torch.distributed.<op>`` by attribute, so wrapping the module functions sees them all.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import runpy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
)
SEEN: collections.Counter = collections.Counter()


def _dtypes(args, kwargs) -> set[str]:
    found = set()
    for value in [*args, *kwargs.values()]:
        tensors = value if isinstance(value, (list, tuple)) else [value]
        found |= {str(t.dtype) for t in tensors if isinstance(t, torch.Tensor)}
    return found


def _wrap(name: str) -> None:
    original = getattr(dist, name)

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        for dtype in _dtypes(args, kwargs):
            SEEN[f"{name} {dtype}"] += 1
        return original(*args, **kwargs)

    setattr(dist, name, recorded)


def _write() -> None:
    rank = os.environ.get("RANK", "0")
    out = Path(os.environ["BLIP2_COLLECTIVES_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(dict(SEEN), indent=1, sort_keys=True))


if __name__ == "__main__":
    for operation in OPERATIONS:
        _wrap(operation)
    atexit.register(_write)
    sys.path.insert(0, str(REPO / "launch"))
    sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")
