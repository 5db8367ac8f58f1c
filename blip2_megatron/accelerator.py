"""The one module that knows which device type we run on (CUDA GPU, Ascend NPU or CPU).

Everything else asks this module for a device, a communication backend, an autocast
context, memory figures or RNG state. The decision is DeepSpeed's
``get_accelerator()`` (``DS_ACCELERATOR`` first, then NPU when torch_npu imports, then
CUDA, then CPU), so the package agrees with the DeepSpeed engine it hands models to.

On Ascend, torch_npu and its ``transfer_to_npu`` mapping are imported by the package root
(``blip2_megatron/__init__.py``) before anything can import megatron-core: megatron-core
binds some ``torch.cuda`` names at import time, so the mapping must come first. MindSpeed
is not imported at all: its adaptor patches Megatron-LM's training loop, model classes and
fused kernels (and needs ``megatron.training``, which the megatron-core wheel lacks), none
of which this package uses; the tensor-parallel primitives and process groups we take from
megatron-core need only the ``torch.cuda`` -> ``torch.npu`` mapping.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPE_BY_NAME = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Peak dense (no sparsity) matmul throughput per device in TFLOP/s, the MFU denominator,
# from the vendors' data sheets. Keyed by a fragment of the device name as the accelerator
# reports it, upper-cased without spaces or dashes ("NVIDIA H100 PCIe" -> "NVIDIAH100PCIE",
# "Ascend910B3"); the first matching key wins, so variants come before their family.
# "tf32" is the fp32 matmul rate with TF32 allowed. Ascend's fp32 rate is not listed: no MFU.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100PCIE": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H200NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    "H800PCIE": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H800": {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0},  # SXM
    "H20": {"bf16": 148.0, "fp16": 148.0, "tf32": 74.0, "fp32": 44.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},  # SXM and PCIe
    "A800": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "L40": {"bf16": 181.0, "fp16": 181.0, "tf32": 90.5, "fp32": 90.5},
    "ASCEND910B1": {"bf16": 414.0, "fp16": 414.0},
    "ASCEND910B2": {"bf16": 376.0, "fp16": 376.0},  # also 910B2C
    "ASCEND910B3": {"bf16": 313.0, "fp16": 313.0},
    "ASCEND910B4": {"bf16": 280.0, "fp16": 280.0},
    # 910C (Atlas A3, "Ascend910_93xx"): torch_npu shows each of its two dies as a device.
    "ASCEND910_93": {"bf16": 376.0, "fp16": 376.0},
}


@functools.lru_cache(maxsize=1)
def _ds_accelerator() -> Any:
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "npu":
        _import_ascend_adaptors()
    return accelerator


def _import_ascend_adaptors() -> None:
    """On Ascend, map torch.cuda calls (made inside megatron-core) to torch.npu when possible.

    The package root has normally done this already (before megatron-core was imported);
    importing again is free. No MindSpeed: see the module docstring.
    """
    for module in ("torch_npu", "torch_npu.contrib.transfer_to_npu"):
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


def device_tensor(values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values`` as a tensor on this process's device: what a collective on a device group carries.

    NCCL takes only CUDA tensors and HCCL only NPU ones; a tensor made without a device
    stays on the CPU and fails there (gloo, on CPU, takes either, so CPU runs cannot show
    it). Host-side flags go through ``parallel.state.host_group()`` as CPU tensors instead.
    """
    return torch.tensor(values, dtype=dtype, device=current_device())


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


def peak_tflops(dtype: str, device_name: str | None = None) -> float | None:
    """Peak dense TFLOP/s of this device (or ``device_name``) for ``dtype``; None if unknown.

    ``dtype``: 'bf16', 'fp16' or 'fp32'; fp32 matmuls count at the TF32 rate when TF32 is
    allowed on a CUDA device (:func:`allow_tf32`). On CPU, where no data sheet applies, the
    rate is measured (:func:`measured_cpu_peak_tflops`).
    """
    if device_name is None and is_cpu():
        return measured_cpu_peak_tflops(dtype)
    name = (device_name or device_name_for_peak()).upper().replace(" ", "").replace("-", "")
    if dtype == "fp32" and device_name is None and device_type() == "cuda" and tf32_allowed():
        dtype = "tf32"
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(dtype)
    return None


@functools.cache
def measured_cpu_peak_tflops(dtype: str, max_size: int = 2048, budget_s: float = 1.5) -> float | None:
    """This CPU's matmul rate for ``dtype`` with this process's threads, in TFLOP/s.

    The best of several products of two square matrices: what a large dense matmul reaches
    here, the denominator of CPU MFU. The products go through ``F.linear``, the kernel the
    model's Linear layers run: on a CPU without bf16 instructions (bf16 is emulated there)
    ``torch.mm``'s bf16 path is ~10x slower than it, and a peak below the model's own rate
    gave an MFU above 1. Measured once per process, in about ``budget_s`` seconds whatever
    the CPU: the side doubles from 256 up to ``max_size`` while one product takes under a
    twentieth of the budget, then products of that side repeat (up to ten) until the
    budget is spent (emulated bf16 runs 6-75x slower than fp32, so a fixed size would not
    do). None for a dtype the CPU does not compute (fp16). Call it before a memory window
    opens: it allocates three matrices.
    """
    torch_dtype = DTYPE_BY_NAME[dtype]
    if not supports_dtype(torch_dtype):
        return None
    gen = torch.Generator().manual_seed(0)
    size = 256
    while True:
        a = torch.randn(size, size, generator=gen).to(torch_dtype)
        b = torch.randn(size, size, generator=gen).to(torch_dtype)
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)  # warm-up at this size: decides whether to grow
        took = time.perf_counter() - start
        if size >= max_size or took > budget_s / 20:
            break
        size *= 2
    best, spent = float("inf"), 0.0
    for _ in range(10):
        start = time.perf_counter()
        torch.nn.functional.linear(a, b)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return 2.0 * size**3 / best / 1e12


def tf32_allowed() -> bool:
    return torch.get_float32_matmul_precision() != "highest"


def allow_tf32() -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores on GPU (no-op elsewhere)."""
    if device_type() == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def supports_dtype(dtype: torch.dtype) -> bool:
    if dtype == torch.float32:
        return True
    if is_cpu():
        return dtype == torch.bfloat16
    if dtype == torch.bfloat16:
        return bool(get_accelerator().is_bf16_supported())
    return bool(get_accelerator().is_fp16_supported())


def inference_dtype(name: str, trained_in: str) -> torch.dtype | None:
    """The autocast dtype evaluation and generation compute in; None for fp32.

    ``name`` is ``eval.precision``: "auto" follows the training precision ``trained_in`` on
    a device that supports it and stays fp32 on CPU (bf16 matmuls there are slower for small
    shapes and change results); "fp32" / "bf16" / "fp16" ask for one.
    """
    if name == "auto":
        dtype = DTYPE_BY_NAME[trained_in]
        if is_cpu() or not supports_dtype(dtype):
            return None
    else:
        dtype = DTYPE_BY_NAME[name]
        if not supports_dtype(dtype):
            raise ValueError(f"eval.precision={name!r} is not supported on {device_type()}")
    return None if dtype == torch.float32 else dtype


def weight_dtype(name: str) -> torch.dtype:
    """The dtype frozen weights named ``name`` ('fp32' / 'bf16' / 'fp16') are kept in on this device.

    As named, except fp16 on CPU, where half-precision matmuls are slow or missing: fp32.
    """
    dtype = DTYPE_BY_NAME[name]
    return torch.float32 if dtype == torch.float16 and is_cpu() else dtype


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


# Attention on Ascend. torch_npu's fused attention kernel (``npu_fusion_attention``) takes head
# sizes that are multiples of 16, up to 512, on the CANN releases for Atlas A2 (later ones document
# 1..768); for other sizes its SDPA takes the math path and materialises the [B, N, S, S] scores
# (EVA ViT-g's head size 88: 677 x 677 per head and layer at 364 px). Heads of other sizes are
# therefore zero-padded up to the next multiple of 16 (88 -> 96) and still go through the kernel.
NPU_ATTENTION_HEAD_MULTIPLE = 16
NPU_ATTENTION_MAX_HEAD_DIM = 512
# Devices the kernel runs on, as fragments of the name torch_npu reports (upper-cased, no spaces or
# dashes, as for PEAK_TFLOPS): Atlas A2 (910B) and Atlas A3 (910C, "Ascend910_93xx").
NPU_FUSED_ATTENTION_DEVICES = ("ASCEND910B", "ASCEND910_93")

# Head sizes whose math-path fallback has been logged in this process (one warning each).
_MATH_ATTENTION_WARNED: set[int] = set()


def attention_function(head_dim: int) -> Callable[..., torch.Tensor]:
    """The attention for heads of ``head_dim``, called as ``torch.nn.functional.scaled_dot_product_attention``.

    Same arguments (query, key, value ``[B, N, S, D]``, ``attn_mask`` boolean with True = may attend,
    ``dropout_p``, ``is_causal``, ``scale``, ``enable_gqa``), same result. On CUDA and CPU it is SDPA
    itself, which picks its own kernel per call. On Ascend it is torch_npu's fused kernel through
    :func:`_npu_fused_attention` (heads padded where the kernel needs it); where that kernel is missing
    (an older torch_npu, a chip it does not run on) it is SDPA, and a head size that SDPA can only
    serve with its math path is logged once per process.
    """
    if device_type() != "npu":
        return torch.nn.functional.scaled_dot_product_attention
    kernel, why_not = _npu_fusion_attention_kernel()
    if kernel is not None and head_dim <= NPU_ATTENTION_MAX_HEAD_DIM:
        return functools.partial(_npu_fused_attention, kernel)
    if head_dim % NPU_ATTENTION_HEAD_MULTIPLE or head_dim > NPU_ATTENTION_MAX_HEAD_DIM:
        if head_dim not in _MATH_ATTENTION_WARNED:
            _MATH_ATTENTION_WARNED.add(head_dim)
            logger.warning(
                "attention with head size %d on %s (%s) falls back to SDPA's math path, which holds the "
                "full score matrix of every head in memory: %s",
                head_dim,
                device_type(),
                device_name_for_peak(),
                why_not or f"npu_fusion_attention takes head sizes up to {NPU_ATTENTION_MAX_HEAD_DIM}",
            )
    return torch.nn.functional.scaled_dot_product_attention


@functools.lru_cache(maxsize=1)
def _npu_fusion_attention_kernel() -> tuple[Callable[..., Any] | None, str]:
    """``(torch_npu.npu_fusion_attention, "")`` where it runs here, else ``(None, why not)``.

    Decided once per process: the device name is a runtime query, and attention asks per layer.
    """
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError:
        return None, "torch_npu is not installed"
    kernel = getattr(torch_npu, "npu_fusion_attention", None)
    if kernel is None:
        return None, "this torch_npu has no npu_fusion_attention"
    name = device_name_for_peak().upper().replace(" ", "").replace("-", "")
    if not any(family in name for family in NPU_FUSED_ATTENTION_DEVICES):
        return None, f"npu_fusion_attention runs on Atlas A2/A3 (Ascend 910B/910C) only, not on {name}"
    return kernel, ""


def _npu_fused_attention(
    kernel: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA's contract on ``npu_fusion_attention`` (layout "BNSD").

    A head size the kernel does not take is zero-padded on q, k and v: zero columns of q and k add
    nothing to q.k, so the scores are unchanged as long as the scale stays 1/sqrt(true head size);
    zero columns of v give zero output columns, which are cut off. SDPA's boolean mask (True = may
    attend) is inverted into the kernel's (True = masked out) and broadcast to a shape the kernel
    takes ([B or 1, 1, Sq, Skv] or per head); ``is_causal`` is SDPA's triangle aligned to the upper
    left. Fewer key/value heads than query heads (``enable_gqa``) the kernel takes as they are.
    """
    if attn_mask is not None and is_causal:
        raise ValueError("attention takes either attn_mask or is_causal, not both (as SDPA)")
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        raise ValueError(
            f"attention on Ascend takes boolean masks (True = may attend), got {attn_mask.dtype}"
        )
    head_dim = query.shape[-1]
    scale = head_dim**-0.5 if scale is None else scale
    padded_dim = -(-head_dim // NPU_ATTENTION_HEAD_MULTIPLE) * NPU_ATTENTION_HEAD_MULTIPLE
    if padded_dim != head_dim:
        pad = (0, padded_dim - head_dim)
        query, key, value = (torch.nn.functional.pad(t, pad) for t in (query, key, value))
    q_len, kv_len = query.shape[-2], key.shape[-2]
    masked_out, window = None, {}
    if attn_mask is not None:
        masked_out = ~attn_mask
        while masked_out.dim() < 4:
            masked_out = masked_out[None]
        batch = query.shape[0] if masked_out.shape[1] > 1 else masked_out.shape[0]
        masked_out = masked_out.expand(batch, -1, q_len, kv_len).contiguous()
    elif is_causal:
        masked_out = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).triu(1)
        if q_len == kv_len:
            window = {"next_tockens": 0}  # lets the kernel skip the blocks above the diagonal
    out = kernel(
        query.contiguous(),
        key.contiguous(),
        value.contiguous(),
        head_num=query.shape[1],
        input_layout="BNSD",
        atten_mask=masked_out,
        scale=scale,
        keep_prob=1.0 - dropout_p,
        **window,
    )[0]
    return out[..., :head_dim] if padded_dim != head_dim else out
