"""Throughput accounting: FPS, TFLOP/s, MFU and memory, from the FLOPs each batch costs.

The FLOP model (per part, from the config and the batch's real lengths) is
``blip2_megatron.models.flops``; MFU divides each part's FLOPs by the peak rate of the
dtype its matmuls run in (:func:`part_precisions`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config


def add_flops(total: dict[str, float], flops: dict[str, float]) -> None:
    """Add per-part FLOPs into the running ``total``."""
    for part, value in flops.items():
        total[part] = total.get(part, 0.0) + value


def batch_lengths(batch: dict) -> list[int]:
    """Per-sample real token counts of a loader batch (read on the host, before it moves to the device)."""
    return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]


def part_precisions(cfg: Blip2Config, precision: str) -> dict[str, str]:
    """The dtype each part's matmuls run in: trained parts at the engine's ``precision``,
    frozen parts in the dtype their weights are kept in (excluded from DeepSpeed's cast)."""
    names = {dtype: name for name, dtype in accelerator.DTYPE_BY_NAME.items()}
    vision = cfg.vision.frozen_dtype if cfg.vision.freeze else precision
    precisions = {"vision": names[accelerator.weight_dtype(vision)], "qformer": precision}
    if cfg.llm is not None:  # stage 1 has none
        llm = cfg.llm.weight_dtype_name if cfg.llm.freeze else precision
        precisions["llm"] = names[accelerator.weight_dtype(llm)]
    return precisions


def model_flops_utilization(
    flops_by_part: dict[str, float], precisions: dict[str, str], seconds: float, devices: int
) -> float | None:
    """MFU: the time the work would take at each part's peak rate over the time it took.

    A frozen fp16 ViT under an fp32 Q-Former counts at the fp16 and fp32 peaks
    respectively. None when a part's peak is unknown on this device.
    """
    ideal = 0.0
    for part, flops in flops_by_part.items():
        if not flops:
            continue
        peak = accelerator.peak_tflops(precisions[part])
        if not peak:
            return None
        ideal += flops / (peak * 1e12)
    return ideal / (seconds * devices) if seconds > 0 else None


@dataclass
class StepTiming:
    """Host time of one optimizer step's phases (seconds).

    Without device synchronisation (the default in training) the phases are the host's
    time to issue them; ``data`` (waiting for the loader) is exact either way.
    """

    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer


_clock = time.perf_counter  # the meter's clock (a test drives its own)


def _now() -> float:
    return _clock()


@dataclass
class _Window:
    """Totals over a stretch of steps, timed on the wall clock between two device syncs."""

    started: float = field(default_factory=_now)
    steps: int = 0
    data_time: float = 0.0
    paused: float = 0.0  # seconds spent saving or validating, not training
    flops: dict[str, float] = field(default_factory=dict)

    def add(self, timing: StepTiming, flops: dict[str, float]) -> None:
        self.steps += 1
        self.data_time += timing.data
        add_flops(self.flops, flops)


@dataclass
class ThroughputMeter:
    """FPS, TFLOP/s, MFU and memory, read only when the trainer logs.

    Steps are not timed one by one (that needs a device sync per step): the meter adds up
    each step's FLOPs and data wait on the host, and the figures come from the wall clock
    between two log steps, at which the trainer synchronises the device anyway. The
    summary covers every step after ``warmup_steps`` (one more sync, at that step).
    FLOPs are this rank's; the trainer sums them over data-parallel ranks before asking.
    """

    global_batch: int  # images per optimizer step over the whole job
    world_size: int  # devices
    precisions: dict[str, str]  # part -> dtype its matmuls run in (part_precisions)
    warmup_steps: int = 2  # steps excluded from the summary
    steps_seen: int = 0
    started: float = field(default_factory=_now)
    window: _Window = field(default_factory=_Window)  # since the last log step
    measured: _Window | None = None  # since the end of warm-up

    def __post_init__(self) -> None:
        # Look the peak rates up now: on CPU they are measured (under a second), which must
        # not fall inside a timed window.
        for dtype in set(self.precisions.values()):
            accelerator.peak_tflops(dtype)
        self.started = _now()
        self.window = _Window()

    def record(self, timing: StepTiming, flops: dict[str, float]) -> None:
        """Account for one step (host only)."""
        self.steps_seen += 1
        self.window.add(timing, flops)
        if self.measured is not None:
            self.measured.add(timing, flops)
        elif self.steps_seen == self.warmup_steps:
            accelerator.synchronize()
            self.measured = _Window()
        elif self.warmup_steps == 0:
            self.measured = _Window(started=self.window.started)
            self.measured.add(timing, flops)

    def _figures(self, window: _Window, flops: dict[str, float]) -> dict[str, float | None]:
        seconds = max(_now() - window.started - window.paused, 1e-9)
        step_time = seconds / max(window.steps, 1)
        fps = self.global_batch / step_time
        return {
            "fps": fps,
            "fps_per_device": fps / self.world_size,
            "step_time": step_time,
            "data_time": window.data_time / max(window.steps, 1),
            "tflops_per_device": sum(flops.values()) / seconds / self.world_size / 1e12,
            "mfu": model_flops_utilization(flops, self.precisions, seconds, self.world_size),
            "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
        }

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (a checkpoint save, a validation pass) out of the figures."""
        accelerator.synchronize()
        start = _now()
        try:
            yield
        finally:
            accelerator.synchronize()
            for window in (self.window, self.measured):
                if window is not None:
                    window.paused += _now() - start

    def interval(self, global_flops: dict[str, float]) -> dict[str, float | None]:
        """Figures since the last call (the device is synchronised first); starts the next window.

        ``global_flops``: :attr:`window`'s FLOPs summed over data-parallel ranks.
        """
        accelerator.synchronize()
        figures = self._figures(self.window, global_flops)
        self.window = _Window()
        return figures

    def summary(self, global_flops: dict[str, float] | None) -> dict[str, float | int | None]:
        """Mean figures over the steps after warm-up (none when the run was that short).

        ``global_flops``: :attr:`measured`'s FLOPs summed over data-parallel ranks.
        """
        accelerator.synchronize()
        total = {"total_time_s": _now() - self.started}
        if self.measured is None or not self.measured.steps or global_flops is None:
            return {
                "fps_mean": None,
                "fps_per_device_mean": None,
                "step_time_mean": None,
                "tflops_per_device_mean": None,
                "mfu_mean": None,
                "steps_measured": 0,
                "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
                **total,
            }
        figures = self._figures(self.measured, global_flops)
        return {
            "fps_mean": figures["fps"],
            "fps_per_device_mean": figures["fps_per_device"],
            "step_time_mean": figures["step_time"],
            "tflops_per_device_mean": figures["tflops_per_device"],
            "mfu_mean": figures["mfu"],
            "steps_measured": self.measured.steps,
            "peak_mem_gb": figures["peak_mem_gb"],
            **total,
        }
