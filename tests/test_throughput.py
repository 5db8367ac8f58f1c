"""Throughput accounting: FLOPs from the real token counts, precision-aware MFU, the meter's windows."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from blip2_megatron import accelerator
from blip2_megatron.config import build_model_config
from blip2_megatron.models.flops import train_flops_by_part, train_flops_per_image
from blip2_megatron.training import throughput
from blip2_megatron.training.throughput import (
    StepTiming,
    ThroughputMeter,
    batch_lengths,
    model_flops_utilization,
    part_precisions,
)


def _cfg(**changes):
    cfg = build_model_config("blip2_opt2.7b")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def test_flops_follow_real_lengths_not_padding():
    cfg = _cfg()
    mask = torch.zeros(2, 64, dtype=torch.long)
    mask[0, :40] = 1  # 32 query slots + 8 caption tokens
    mask[1, :64] = 1
    lengths = batch_lengths({"attention_mask": mask})
    assert lengths == [40, 64]
    parts = train_flops_by_part(cfg, lengths)
    # The LLM's cost is the sum of each sample's own cost, not twice the padded one.
    assert parts["llm"] == pytest.approx(
        sum(train_flops_by_part(cfg, [n])["llm"] for n in lengths), rel=1e-12
    )
    assert parts["llm"] < 2 * train_flops_by_part(cfg, [64])["llm"]
    # Image parts scale with the number of images only.
    assert parts["vision"] == pytest.approx(2 * train_flops_by_part(cfg, [40])["vision"])
    # The per-image figure at max_txt_len is the same formula.
    assert train_flops_per_image(cfg) == pytest.approx(
        sum(train_flops_by_part(cfg, [cfg.num_image_slots + cfg.max_txt_len]).values())
    )


def test_opt27b_flops_are_dominated_by_the_frozen_parts_forward():
    """BLIP-2 OPT-2.7B: a frozen ViT-g (1x forward) and a frozen LLM (2x: grads flow through)."""
    cfg = _cfg()
    parts = train_flops_by_part(cfg, [32 + 16])
    # ViT-g/14 at 224 px: ~1B parameters over 257 tokens -> ~0.5 TFLOP forward.
    assert 0.4e12 < parts["vision"] < 0.7e12
    # OPT-2.7B, 48 tokens, forward + input gradients: ~2 x 2 x 2.7e9 x 48 FLOPs (+ attention).
    assert 4.5e11 < parts["llm"] < 6.5e11
    assert parts["qformer"] < parts["vision"]


def test_mfu_counts_each_part_at_its_own_peak(monkeypatch):
    monkeypatch.setattr(accelerator, "device_name_for_peak", lambda: "NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(accelerator, "device_type", lambda: "cuda")
    monkeypatch.setattr(accelerator, "tf32_allowed", lambda: False)
    monkeypatch.setattr(accelerator, "is_cpu", lambda: False)
    cfg = _cfg()
    precisions = part_precisions(cfg, "fp32")
    # Frozen ViT and LLM keep their fp16 weights (out of DeepSpeed's cast); the Q-Former trains in fp32.
    assert precisions == {"vision": "fp16", "qformer": "fp32", "llm": "fp16"}
    flops = {"vision": 312e12, "qformer": 19.5e12, "llm": 0.0}
    # One second of work at each part's peak, done in 4 s on 1 device: 2 s / 4 s.
    assert model_flops_utilization(flops, precisions, seconds=4.0, devices=1) == pytest.approx(0.5)
    # Dividing everything by the fp32 peak (the old way) would claim 16x more than possible.
    assert model_flops_utilization(flops, {p: "fp32" for p in flops}, 4.0, 1) > 4
    # With TF32 allowed, fp32 matmuls count at the TF32 rate.
    monkeypatch.setattr(accelerator, "tf32_allowed", lambda: True)
    assert accelerator.peak_tflops("fp32") == 156.0
    # Unknown device: no MFU.
    monkeypatch.setattr(accelerator, "device_name_for_peak", lambda: "Some Accelerator 9000")
    assert model_flops_utilization(flops, precisions, 4.0, 1) is None


def test_cpu_keeps_fp16_frozen_weights_in_fp32_but_honours_bf16():
    assert accelerator.is_cpu()
    cfg = _cfg()
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, dtype="bf16"))
    assert part_precisions(cfg, "bf16") == {"vision": "fp32", "qformer": "bf16", "llm": "bf16"}


def test_meter_reads_the_wall_clock_between_log_steps_and_leaves_pauses_out(monkeypatch):
    clock = [100.0]  # the meter's clock, driven by the test: 20 ms per step
    monkeypatch.setattr(throughput, "_clock", lambda: clock[0])
    meter = ThroughputMeter(global_batch=8, world_size=2, precisions={"llm": "fp32"}, warmup_steps=1)
    flops = {"llm": 1e9}
    clock[0] += 0.02
    meter.record(StepTiming(data=0.001), flops)  # warm-up step: starts the measured window after it
    assert meter.measured is not None and meter.measured.steps == 0
    for _ in range(3):
        clock[0] += 0.02
        meter.record(StepTiming(data=0.001), flops)
    with meter.paused():
        clock[0] += 0.2  # a checkpoint save: not training time
    figures = meter.interval({"llm": 4e9})
    assert figures["step_time"] == pytest.approx(0.02), figures  # 4 steps in 0.08 s, the save left out
    assert figures["fps"] == pytest.approx(8 / 0.02)
    assert figures["data_time"] == pytest.approx(0.001)
    # CPU: MFU against the matmul rate measured on this machine (its value depends on the
    # machine and its load, so the check is the formula, not a range)
    peak = accelerator.peak_tflops("fp32")
    assert peak and peak > 0
    assert figures["mfu"] == pytest.approx(4e9 / (peak * 1e12) / (0.08 * 2)), figures
    summary = meter.summary({"llm": 3e9})
    assert summary["steps_measured"] == 3
    assert summary["step_time_mean"] == pytest.approx(0.02)  # the 3 steps after warm-up
    assert summary["total_time_s"] == pytest.approx(0.28)
    # The next window starts after the log step.
    assert meter.window.steps == 0


def test_meter_summary_without_measured_steps():
    meter = ThroughputMeter(global_batch=8, world_size=1, precisions={}, warmup_steps=5)
    meter.record(StepTiming(), {})
    assert meter.summary(None)["fps_mean"] is None


@pytest.mark.parametrize("flavour", ["tiny_stage1", "tiny", "tiny_minigpt4_llama2"])
def test_every_model_kind_has_its_parts_accounted(flavour):
    """Stage 1 has no LLM, the patch variant no Q-Former: each still gets FLOPs and precisions."""
    cfg = build_model_config(flavour)
    precisions = part_precisions(cfg, "bf16")
    parts = train_flops_by_part(cfg, [12, 20])
    assert set(parts) == set(precisions) == ({"vision", "qformer"} | ({"llm"} if cfg.llm else set()))
    assert all(value > 0 for value in parts.values()), parts
    mfu = model_flops_utilization(parts, precisions, 1.0, 1)  # at this CPU's measured rates
    ideal_seconds = sum(flops / (accelerator.peak_tflops(precisions[p]) * 1e12) for p, flops in parts.items())
    assert mfu == pytest.approx(ideal_seconds) and 0 < mfu, mfu


def test_cpu_peak_is_measured_for_the_dtypes_it_computes():
    started = time.perf_counter()
    fp32 = accelerator.measured_cpu_peak_tflops("fp32", max_size=512, budget_s=0.2)
    bf16 = accelerator.measured_cpu_peak_tflops("bf16", max_size=512, budget_s=0.2)
    # A bounded time (bf16 is emulated, and very slow, on CPUs without bf16 instructions).
    assert time.perf_counter() - started < 5
    for rate in (fp32, bf16):
        assert rate is not None and 1e-4 < rate < 100  # TFLOP/s: a plausible CPU rate, not a data sheet's
    assert accelerator.measured_cpu_peak_tflops("fp16") is None  # CPUs here do not compute fp16 matmuls
    assert accelerator.peak_tflops("fp32") == accelerator.measured_cpu_peak_tflops("fp32")
