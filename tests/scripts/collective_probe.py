"""launch/train.py with every torch.distributed collective recorded and checked for its device.

    BLIP2_COLLECTIVES_DIR=/tmp/probe deepspeed --num_gpus 2 tests/scripts/collective_probe.py <launch/train.py arguments>

Each rank writes ``rank{R}.json`` when it exits: ``seen``, the distinct operation/dtype
pairs it issued with counts, and ``host_tensors``, the collectives on a device group (any
group but ``state.host_group()``) that carried a host tensor, each with the line of the
package that issued it. DeepSpeed's communication layer and megatron-core both call
``torch.distributed.<op>`` by attribute, so wrapping the module functions sees them all.

Why a host tensor can be told apart on a CPU-only machine: NCCL takes only CUDA tensors and
HCCL only NPU ones, while gloo takes anything, so a run here cannot fail on it. On CPU the
device and the host are the same memory, so the device of a tensor says nothing; how it was
made does. :class:`HostTensorTracker` marks the tensors made for the host: by a factory
(``torch.ones``, ``torch.tensor``, ...) called without a device, or by ``.cpu()``; results
computed from a marked tensor are marked too, and ``.to(<device>)`` clears the mark (that is
the move a GPU run needs). A device named in code counts as the device whatever it is:
DeepSpeed names the CPU accelerator's device "cpu", so ``device="cpu"`` cannot be told from
it; the mistake this catches is the tensor made without thinking of a device. Those are exactly the tensors that would still be on the CPU on
a GPU or NPU. ``torch.ones(1, device=accelerator.current_device())``, a loss, a gradient, a
parameter moved to the device: unmarked.
"""

from __future__ import annotations

import atexit
import collections
import functools
import json
import os
import runpy
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

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
HOST_TENSORS: collections.Counter = collections.Counter()
_MARK = "_made_for_host"


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def is_host_tensor(tensor: torch.Tensor) -> bool:
    return bool(getattr(tensor, _MARK, False))


def _set_mark(value, marked: bool) -> None:
    for tensor in _tensors(value):
        try:
            setattr(tensor, _MARK, marked)
        except (AttributeError, RuntimeError):  # a tensor type without a __dict__
            pass


class HostTensorTracker(TorchFunctionMode):
    """Marks the tensors that would live on the host on an accelerator (see the module docstring).

    It also counts host syncs: the calls that read a device tensor's value on the host
    (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()``, ...), each of which
    waits for the device queue on a GPU or NPU. ``syncs`` counts them by the line that
    made them; reads of host tensors wait for nothing and are not counted. ``.to("cpu")``
    is not counted: DeepSpeed moves tensors with ``.to(<accelerator device name>)``, which
    is "cpu" on the CPU accelerator and "cuda:0" on a GPU, and the two cannot be told apart.
    """

    FACTORIES = frozenset(_device_constructors())
    READS = frozenset(
        {
            torch.Tensor.item,
            torch.Tensor.tolist,
            torch.Tensor.cpu,
            torch.Tensor.numpy,
            torch.Tensor.__bool__,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__index__,
        }
    )

    def __init__(self) -> None:
        super().__init__()
        self.syncs: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS and not is_host_tensor(args[0]):
            self.syncs[f"{getattr(func, '__name__', func)} from {_caller()}"] += 1
        out = func(*args, **kwargs)
        if func in self.FACTORIES:
            if kwargs.get("device") is None:
                _set_mark(out, True)
        elif func is torch.Tensor.cpu:
            _set_mark(out, True)
        elif func is torch.Tensor.to:
            target = kwargs.get(
                "device", next((a for a in args[1:] if isinstance(a, (torch.device, str))), None)
            )
            if target is None and any(isinstance(a, torch.Tensor) for a in args[1:]):
                target = "like another tensor"
            _set_mark(out, is_host_tensor(args[0]) if target is None else False)  # None: a dtype change
        elif any(is_host_tensor(t) for t in _tensors(args) + _tensors(kwargs)):
            _set_mark(out, True)
        return out


def _caller() -> str:
    """The innermost line of this package (or of the launch scripts) on the stack, else the caller's."""
    stack = traceback.extract_stack()[:-2]
    for frame in reversed(stack):
        if "blip2_megatron" in frame.filename or "/launch/" in frame.filename:
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    frame = next(f for f in reversed(stack) if "collective_probe" not in f.filename)
    return f"{frame.filename}:{frame.lineno} {frame.name}"


def _on_host_group(args, kwargs) -> bool:
    from blip2_megatron.parallel import state

    group = kwargs.get("group")
    if group is None:
        group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
    try:
        return group is not None and group is state.host_group()
    except RuntimeError:  # no host group yet: nothing is on it
        return False


def _wrap(name: str) -> None:
    original = getattr(dist, name)

    @functools.wraps(original)
    def recorded(*args, **kwargs):
        tensors = _tensors(list(args)) + _tensors(kwargs)
        for dtype in {str(t.dtype) for t in tensors}:
            SEEN[f"{name} {dtype}"] += 1
        if any(is_host_tensor(t) for t in tensors) and not _on_host_group(args, kwargs):
            HOST_TENSORS[f"{name} from {_caller()}"] += 1
        return original(*args, **kwargs)

    setattr(dist, name, recorded)


def install() -> HostTensorTracker:
    """Wrap the collectives and start marking host tensors (in this thread); returns the mode."""
    for operation in OPERATIONS:
        _wrap(operation)
    tracker = HostTensorTracker()
    tracker.__enter__()
    return tracker


def _write() -> None:
    rank = os.environ.get("RANK", "0")
    out = Path(os.environ["BLIP2_COLLECTIVES_DIR"])
    out.mkdir(parents=True, exist_ok=True)
    record = {"seen": dict(SEEN), "host_tensors": dict(HOST_TENSORS)}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1, sort_keys=True))


if __name__ == "__main__":
    install()
    atexit.register(_write)
    sys.path.insert(0, str(REPO / "launch"))
    sys.argv = [str(REPO / "launch" / "train.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")
