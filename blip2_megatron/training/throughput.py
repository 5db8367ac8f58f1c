"""Throughput accounting: FLOPs per image from the model config, FPS, TFLOP/s, MFU, memory.

FLOPs count matmuls only (2 per multiply-add), as Megatron and nanoGPT's MFU do. Per
training step each part costs: trained = 3x forward (forward, input grads, weight grads),
frozen with gradients flowing through it to something trainable = 2x forward (forward and
input grads), frozen with nothing trainable upstream = 1x forward.
"""

from __future__ import annotations

import time
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


def train_flops_per_image(cfg: Blip2Config, text_len: int | None = None) -> float:
    """Training FLOPs for one image-text sample, following the frozen/trained split."""
    text_len = text_len or cfg.max_txt_len
    q = cfg.qformer.num_query_tokens
    image_tokens = cfg.vision.num_positions
    vision = vision_forward_flops(cfg.vision) * (1 if cfg.vision.freeze else 3)
    if cfg.kind == "stage1":
        t = cfg.qformer.max_txt_len
        passes = (
            qformer_forward_flops(cfg.qformer, q, 0, image_tokens)  # ITC image side
            + qformer_forward_flops(cfg.qformer, 0, t, 0)  # ITC text side
            + 3 * qformer_forward_flops(cfg.qformer, q, t, image_tokens)  # ITM on 3B pairs
            + qformer_forward_flops(cfg.qformer, q, t, 0)  # ITG (query K/V reused)
        )
        return vision + 3 * passes
    qformer = qformer_forward_flops(cfg.qformer, q, 0, image_tokens) * (1 if cfg.freeze_qformer else 3)
    projection = 2.0 * q * cfg.qformer.hidden_size * cfg.llm.hidden_size * 3
    llm = llm_forward_flops(cfg.llm, q + text_len) * (3 if not cfg.llm.freeze else 2)
    return vision + qformer + projection + llm


@dataclass
class StepTiming:
    """Where one optimizer step's time went (seconds)."""

    data: float = 0.0
    forward: float = 0.0
    backward: float = 0.0
    optimizer: float = 0.0

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.optimizer


@dataclass
class ThroughputMeter:
    """Turns step timings into FPS, TFLOP/s, MFU; keeps the post-warm-up history."""

    global_batch: int  # images per optimizer step over the whole job
    world_size: int  # devices
    flops_per_image: float  # training FLOPs per image
    precision: str = "fp32"
    warmup_steps: int = 2  # steps excluded from the summary
    history: list[float] = field(default_factory=list)  # step times after warm-up
    steps_seen: int = 0
    started: float = field(default_factory=time.perf_counter)

    def record(self, timing: StepTiming) -> dict[str, float | str | None]:
        """Figures for one step: global FPS, FPS/device, TFLOP/s/device, MFU, memory."""
        self.steps_seen += 1
        step_time = max(timing.total, 1e-9)
        if self.steps_seen > self.warmup_steps:
            self.history.append(step_time)
        fps = self.global_batch / step_time
        tflops = self.flops_per_image * fps / self.world_size / 1e12
        peak = accelerator.peak_tflops(self.precision)
        return {
            "fps": fps,
            "fps_per_device": fps / self.world_size,
            "step_time": step_time,
            "data_time": timing.data,
            "forward_time": timing.forward,
            "backward_time": timing.backward,
            "optimizer_time": timing.optimizer,
            "tflops_per_device": tflops,
            "mfu": (tflops / peak) if peak else None,
            "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
        }

    def summary(self) -> dict[str, float | int | None]:
        """Mean figures over the steps after warm-up (all steps if the run was shorter)."""
        times = self.history
        mean_step = sum(times) / len(times) if times else None
        fps = self.global_batch / mean_step if mean_step else None
        tflops = self.flops_per_image * fps / self.world_size / 1e12 if fps else None
        peak = accelerator.peak_tflops(self.precision)
        return {
            "fps_mean": fps,
            "fps_per_device_mean": fps / self.world_size if fps else None,
            "step_time_mean": mean_step,
            "tflops_per_device_mean": tflops,
            "mfu_mean": (tflops / peak) if (tflops and peak) else None,
            "steps_measured": len(times),
            "total_time_s": time.perf_counter() - self.started,
            "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
        }
