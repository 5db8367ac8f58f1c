"""The one module that knows which device type we run on (CUDA GPU, Ascend NPU or CPU).

Everything else asks this module for a device, a communication backend, an autocast
context, memory figures or RNG state. The decision is DeepSpeed's
``get_accelerator()`` (``DS_ACCELERATOR`` first, then NPU when torch_npu imports, then
CUDA, then CPU), so the package agrees with the DeepSpeed engine it hands models to.
On Ascend, MindSpeed's adaptor is imported when present so that megatron-core's
``torch.cuda`` calls land on ``torch.npu``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPE_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Peak dense matmul throughput per device in TFLOP/s, for MFU. Keyed by a substring of the
# device name reported by the accelerator; the first match wins.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "Ascend910B": {"bf16": 313.0, "fp16": 313.0, "fp32": 75.0},
}


@functools.lru_cache(maxsize=1)
def _ds_accelerator() -> Any:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "npu":
        _import_ascend_adaptors()
    return accelerator


def _import_ascend_adaptors() -> None:
    """On Ascend, map torch.cuda calls (made inside megatron-core) to torch.npu when possible."""
    for module in ("torch_npu", "torch_npu.contrib.transfer_to_npu", "mindspeed.megatron_adaptor"):
        try:
            importlib.import_module(module)
            logger.info("imported %s", module)
        except ImportError:
            logger.info("%s is not installed; continuing without it", module)


def get_accelerator() -> Any:
    """DeepSpeed's accelerator object (cached)."""
    return _ds_accelerator()


def device_type() -> str:
    """'cuda', 'npu' or 'cpu'."""
    return get_accelerator().device_name()


def is_cpu() -> bool:
    return device_type() == "cpu"


def current_device() -> torch.device:
    """The torch.device this process should put its tensors on."""
    if is_cpu():
        return torch.device("cpu")
    return torch.device(get_accelerator().current_device_name())


def set_device(local_rank: int) -> None:
    """Bind this process to its local device (no-op on CPU)."""
    if not is_cpu():
        get_accelerator().set_device(local_rank)


def communication_backend() -> str:
    """nccl on CUDA, hccl on Ascend, gloo on CPU (ccl when oneCCL is installed)."""
    return get_accelerator().communication_backend_name()


def device_name_for_peak() -> str:
    """A human-readable device name used to look up peak FLOP/s ('cpu' on CPU)."""
    if is_cpu():
        return "cpu"
    if device_type() == "cuda":
        return torch.cuda.get_device_name()
    try:
        return str(torch.npu.get_device_name())  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - any failure just means "unknown device"
        return device_type()


def peak_tflops(dtype: str) -> float | None:
    """Peak dense TFLOP/s of this device for ``dtype`` ('bf16'/'fp16'/'fp32'), None if unknown."""
    name = device_name_for_peak().replace(" ", "")
    for key, table in PEAK_TFLOPS.items():
        if key.replace(" ", "") in name:
            return table.get(dtype)
    return None


def supports_dtype(dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return True
    if is_cpu():
        return dtype == torch.bfloat16
    if dtype == torch.bfloat16:
        return bool(get_accelerator().is_bf16_supported())
    return bool(get_accelerator().is_fp16_supported())


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast on this device type, or a null context for fp32 / None."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type(), dtype=dtype)


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)
    if not is_cpu():
        get_accelerator().manual_seed_all(seed)


def rng_state() -> dict[str, Any]:
    """Device RNG state to save in a checkpoint (empty on CPU: torch's CPU RNG covers it)."""
    if is_cpu():
        return {}
    return {"device": get_accelerator().get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    if state.get("device") is not None and not is_cpu():
        get_accelerator().set_rng_state(state["device"])


def synchronize() -> None:
    if not is_cpu():
        get_accelerator().synchronize()


class _RssPeakSampler:
    """Peak resident memory of this process since ``reset``, sampled every few milliseconds.

    The kernel's own peak (ru_maxrss) cannot be reset and a child process inherits its
    parent's as a floor across fork/exec, so CPU memory comparisons sample instead.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._thread: threading.Thread | None = None

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset(self) -> None:
        self.peak = self.current()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rss-peak", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.current())
            time.sleep(0.005)

    def read(self) -> int | None:
        return max(self.peak, self.current()) if self._thread is not None else None


_RSS_PEAK = _RssPeakSampler()


def reset_peak_memory() -> None:
    """Start a fresh peak-memory window (device memory; on CPU, sampled resident memory)."""
    if is_cpu():
        if os.path.exists("/proc/self/statm"):
            _RSS_PEAK.reset()
        return
    get_accelerator().reset_peak_memory_stats()


def peak_memory_bytes() -> int:
    """Peak device memory allocated since the last reset; on CPU, the process's peak RSS."""
    if is_cpu():
        sampled = _RSS_PEAK.read()
        if sampled is not None:
            return sampled
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return int(get_accelerator().max_memory_allocated())


def device_count() -> int:
    return int(get_accelerator().device_count()) if not is_cpu() else 1
