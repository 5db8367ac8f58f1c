"""Throughput accounting: FLOPs per image from the model config, FPS, TFLOP/s, MFU, memory.

FLOPs count matmuls only (2 per multiply-add), as Megatron and nanoGPT's MFU do. Per
training step each part costs: trained = 3x forward (forward, input grads, weight grads),
frozen with gradients flowing through it to something trainable = 2x forward (forward and
input grads), frozen with nothing trainable upstream = 1x forward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig


def vision_forward_flops(cfg: VisionConfig) -> float:
    n, d, i = cfg.num_positions, cfg.hidden_size, cfg.intermediate_size
    patch = 2.0 * cfg.num_patches * 3 * cfg.patch_size**2 * d
    per_layer = 2.0 * n * (4 * d * d + 2 * d * i) + 4.0 * n * n * d
    return patch + cfg.num_layers * per_layer


def qformer_forward_flops(cfg: QFormerConfig, num_query: int, num_text: int, image_tokens: int) -> float:
    """One Q-Former pass over ``num_query`` query and ``num_text`` text tokens."""
    h, i, dv = cfg.hidden_size, cfg.intermediate_size, cfg.encoder_hidden_size
    s = num_query + num_text
    total = 0.0
    for layer in range(cfg.num_layers):
        total += 2.0 * s * 4 * h * h + 4.0 * s * s * h + 2.0 * s * 2 * h * i
        if cfg.has_cross_attention(layer) and num_query:
            total += 2.0 * num_query * 2 * h * h  # query and output projections
            total += 2.0 * image_tokens * 2 * dv * h  # image keys and values
            total += 4.0 * num_query * image_tokens * h
    return total


def llm_forward_flops(cfg: LLMConfig, seq_len: int) -> float:
    d, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    attn_proj = 2 * d * d + 2 * d * kv
    ffn = (3 if cfg.arch == "llama" else 2) * d * cfg.intermediate_size
    per_layer = 2.0 * seq_len * (attn_proj + ffn) + 4.0 * seq_len * seq_len * d
    return cfg.num_layers * per_layer + 2.0 * seq_len * d * cfg.vocab_size


def train_flops_by_part(cfg: Blip2Config, lengths: list[int]) -> dict[str, float]:
    """Training FLOPs of one batch by part (``vision``, ``qformer``, ``llm``), from its real lengths.

    ``lengths``: per sample, the tokens the model reads without padding: the LLM input
    (image slots, prompt and caption) for LLM jobs; the caption for stage 1. Padding is
    computed but is not useful work, so it does not count (as MFU is usually defined).
    """
    q = cfg.qformer.num_query_tokens
    image_tokens = cfg.vision.num_positions
    images = len(lengths)
    parts = {"vision": images * vision_forward_flops(cfg.vision) * (1 if cfg.vision.freeze else 3)}
    if cfg.kind == "stage1":
        per_caption = [
            qformer_forward_flops(cfg.qformer, q, 0, image_tokens)  # ITC image side
            + qformer_forward_flops(cfg.qformer, 0, t, 0)  # ITC text side
            + 3 * qformer_forward_flops(cfg.qformer, q, t, image_tokens)  # ITM on 3B pairs
            + qformer_forward_flops(cfg.qformer, q, t, 0)  # ITG (query K/V reused)
            for t in lengths
        ]
        parts["qformer"] = 3 * sum(per_caption)
        return parts
    if cfg.image_encoder == "patches":
        parts["qformer"] = 0.0
    else:
        parts["qformer"] = images * qformer_forward_flops(cfg.qformer, q, 0, image_tokens)
        parts["qformer"] *= 1 if cfg.freeze_qformer else 3
    parts["qformer"] += images * 2.0 * cfg.num_image_slots * cfg.image_feature_size * cfg.llm.hidden_size * 3
    parts["llm"] = sum(llm_forward_flops(cfg.llm, n) for n in lengths) * (2 if cfg.llm.freeze else 3)
    return parts


def add_flops(total: dict[str, float], flops: dict[str, float]) -> None:
    """Add per-part FLOPs into the running ``total``."""
    for part, value in flops.items():
        total[part] = total.get(part, 0.0) + value


def batch_lengths(batch: dict) -> list[int]:
    """Per-sample real token counts of a loader batch (read on the host, before it moves to the device)."""
    return [int(n) for n in batch["attention_mask"].sum(dim=1).tolist()]


def train_flops_per_image(cfg: Blip2Config, text_len: int | None = None) -> float:
    """Training FLOPs of one image-text sample whose caption has ``text_len`` tokens (``max_txt_len``)."""
    text_len = text_len or cfg.max_txt_len
    length = text_len if cfg.kind == "stage1" else cfg.num_image_slots + text_len
    return sum(train_flops_by_part(cfg, [length]).values())


def part_precisions(cfg: Blip2Config, precision: str) -> dict[str, str]:
    """The dtype each part's matmuls run in: trained parts at the engine's ``precision``,
    frozen parts in the dtype their weights are kept in (excluded from DeepSpeed's cast)."""
    names = {dtype: name for name, dtype in accelerator.DTYPE_BY_NAME.items()}
    vision = cfg.vision.frozen_dtype if cfg.vision.freeze else precision
    precisions = {"vision": names[accelerator.weight_dtype(vision)], "qformer": precision}
    if cfg.llm is not None:  # stage 1 has none
        llm = cfg.llm.dtype if cfg.llm.freeze else precision
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


@dataclass
class _Window:
    """Totals over a stretch of steps, timed on the wall clock between two device syncs."""

    started: float = field(default_factory=time.perf_counter)
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
    started: float = field(default_factory=time.perf_counter)
    window: _Window = field(default_factory=_Window)  # since the last log step
    measured: _Window | None = None  # since the end of warm-up

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
        seconds = max(time.perf_counter() - window.started - window.paused, 1e-9)
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
        start = time.perf_counter()
        try:
            yield
        finally:
            accelerator.synchronize()
            for window in (self.window, self.measured):
                if window is not None:
                    window.paused += time.perf_counter() - start

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
        total = {"total_time_s": time.perf_counter() - self.started}
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
