"""Parameter counts on the meta device: the tiny flavour pinned, the real flavours in range."""

from __future__ import annotations

import pytest

from blip2_megatron.config import FLAVOURS, ConfigError, build_model_config
from blip2_megatron.models.param_count import build_meta_model, count_parameters, format_report


def linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def layer_norm(width: int) -> int:
    return 2 * width


# The tiny flavour, part by part (H = 64 everywhere, FFN 256, 2 ViT / 2 Q-Former / 4 LLM layers).
H, FFN = 64, 256
VIT_LAYER = layer_norm(H) + linear(H, 3 * H) + linear(H, H) + layer_norm(H) + linear(H, FFN) + linear(FFN, H)
# class token, 16 patches + 1 positions, patch embedding, blocks, ln_vision
VIT = H + (16 + 1) * H + linear(3 * 8 * 8, H) + 2 * VIT_LAYER + layer_norm(H)
ATTENTION = 3 * linear(H, H) + linear(H, H) + layer_norm(H)  # q/k/v + output dense + LayerNorm
QFORMER_LAYER = 2 * ATTENTION + linear(H, FFN) + linear(FFN, H) + layer_norm(H)  # self + cross, query FFN
QFORMER = layer_norm(H) + 2 * QFORMER_LAYER + 8 * H  # + 8 query tokens
PROJECTION = linear(H, H)
LLM_LAYER = 2 * layer_norm(H) + 4 * linear(H, H) + linear(H, FFN) + linear(FFN, H)
LLM = 512 * H + (128 + 2) * H + 4 * LLM_LAYER + layer_norm(H)  # tied head: no extra weight


@pytest.fixture
def group(single_process_group):
    yield


def test_tiny_counts_are_pinned(group):
    report = count_parameters(build_model_config("tiny"), name="tiny")
    counts = {name: part.total for name, part in report.parts.items() if part.total}
    assert counts == {"ViT": VIT, "Q-Former (+queries)": QFORMER, "projection": PROJECTION, "LLM": LLM}
    assert (VIT, QFORMER, PROJECTION, LLM) == (113_600, 134_144, 4_160, 241_152)
    assert report.total == 493_056
    # stage 2 trains the Q-Former, queries and projection; ViT and LLM are frozen
    assert report.trainable == QFORMER + PROJECTION == 138_304
    assert report.parts["ViT"].frozen == VIT and report.parts["LLM"].frozen == LLM
    [stage] = report.stages
    assert (stage.params_per_tp_rank, stage.trainable_per_tp_rank) == (report.total, report.trainable)
    assert "tiny (kind llm, tp=1, pp=1)" in format_report(report)


def test_tiny_per_rank_counts_follow_the_tp_split_and_pipeline_ranges(group):
    report = count_parameters(build_model_config("tiny"), tp=2, pp=2)
    assert [s.layers for s in report.stages] == [(0, 2), (2, 4)]
    # Per TP rank: q/k/v/fc1 (weights and biases) and o/fc2 weights are halved; norms and
    # the row-parallel biases of o/fc2 are whole; the vocabulary is split by rows.
    q_k_v = 3 * (H * H // 2 + H // 2)
    o = H * H // 2 + H
    fc1, fc2 = H * FFN // 2 + FFN // 2, FFN * H // 2 + H
    layer = 2 * layer_norm(H) + q_k_v + o + fc1 + fc2
    assert layer == 25_184
    embedding = 512 // 2 * H
    first = VIT + QFORMER + PROJECTION + embedding + 130 * H + 2 * layer
    last = 2 * layer + layer_norm(H) + embedding  # the tied head keeps its own copy on another stage
    assert [s.params_per_tp_rank for s in report.stages] == [first, last] == [326_976, 66_880]
    assert [s.trainable_per_tp_rank for s in report.stages] == [QFORMER + PROJECTION, 0]
    assert "head" in report.stages[1].holds and "ViT" in report.stages[0].holds


def test_vocab_rows_are_rounded_up_per_rank(group):
    """Vicuna's 32001 rows do not divide by 2: each rank holds 16001 (one padding row)."""
    report = count_parameters(build_model_config("blip2_vicuna7b"), tp=2, pp=2)
    hidden, ffn = 4096, 11008
    layer = 4 * hidden * hidden // 2 + 3 * hidden * ffn // 2 + 2 * hidden  # q/k/v/o, gate/up/down, norms
    head = 16001 * hidden  # untied
    start, end = report.stages[1].layers
    assert report.stages[1].params_per_tp_rank == (end - start) * layer + hidden + head


def test_pipeline_stages_are_balanced_by_training_flops(group):
    """Stage 0 runs the image path besides its layers: it gets fewer, and no stage is a layer
    heavier than it must be. With no image path to speak of the split is even."""
    from blip2_megatron.models.flops import pipeline_unit_costs

    cfg = build_model_config("blip2_vicuna7b")
    report = count_parameters(cfg, pp=4)
    costs = pipeline_unit_costs(cfg)  # 39 ViT blocks, the bridge, 32 layers, the head
    image_path, layer = sum(costs[:40]), costs[40]
    assert image_path > 5 * layer  # ViT-g at 224 px, frozen, vs one frozen LLaMA-7B layer
    flops = [s.train_flops_per_sample for s in report.stages]
    counts = [end - start for start, end in (s.layers for s in report.stages)]
    assert counts[0] < min(counts[1:]) and sum(counts) == 32, counts
    # No stage above the mean by more than a layer, unless it is stage 0 with a single layer.
    assert max(flops) <= max(image_path + layer, sum(flops) / 4 + layer), flops
    # The even split would leave stage 0 with 8 layers plus the image path: ~50% over the rest.
    assert max(flops) < 0.8 * (8 * layer + image_path)
    assert [s.layers for s in count_parameters(build_model_config("tiny"), pp=2).stages] == [(0, 2), (2, 4)]
    assert report.flops_ratio == max(flops) / min(flops)


def test_a_trained_vit_spreads_over_stages(group):
    """The caption job's ViT-g trained at 364 px: stage 0 holds ViT blocks only, the next
    ones the rest with the Q-Former and the LLM; the FLOPs and parameters follow the blocks."""
    cfg = build_model_config("blip2_opt2.7b", {"vision": {"freeze": False, "image_size": 364}})
    report = count_parameters(cfg, pp=2)
    first, last = report.stages
    assert first.vision_blocks == (0, last.vision_blocks[0]) and last.vision_blocks[1] == 39
    assert first.holds == [f"ViT blocks 0-{last.vision_blocks[0] - 1}"] and first.layers == (0, 0)
    assert last.holds[:2] == [f"ViT blocks {last.vision_blocks[0]}-38", "Q-Former (+queries)"]
    assert report.flops_ratio <= 1.25
    assert first.params_per_tp_rank + last.params_per_tp_rank == report.total  # the tied head stays whole
    assert first.trainable_per_tp_rank == first.params_per_tp_rank  # trained ViT blocks only
    assert "costliest / cheapest stage" in format_report(report)


@pytest.mark.parametrize(
    "flavour, part, low, high",
    [
        ("blip2_opt2.7b", "ViT", 0.98e9, 1.0e9),  # EVA ViT-g/14, 39 of its 40 blocks
        ("blip2_opt2.7b", "Q-Former (+queries)", 0.1e9, 0.19e9),
        ("blip2_stage1_vitg", "Q-Former (+queries)", 0.1e9, 0.19e9),  # + text embeddings and FFNs
        ("blip2_opt2.7b", "LLM", 2.6e9, 2.7e9),
        ("blip2_opt6.7b", "LLM", 6.6e9, 6.7e9),
        ("blip2_vicuna7b", "LLM", 6.7e9, 6.8e9),
        ("blip2_vicuna13b", "LLM", 12.9e9, 13.1e9),
    ],
)
def test_real_flavours_are_in_the_published_ranges(group, flavour, part, low, high):
    report = count_parameters(build_model_config(flavour))
    assert low <= report.parts[part].total <= high, format_report(report)


def test_every_flavour_counts_on_the_meta_device_without_memory(group):
    import torch

    for name in FLAVOURS:
        cfg = build_model_config(name)  # every flavour ships with tp = pp = 1
        model = build_meta_model(cfg)
        assert all(p.device == torch.device("meta") for p in model.parameters()), name
        report = count_parameters(cfg, name=name)
        assert report.total == sum(p.numel() for p in model.parameters()), name
    # OPT-2.7B as transformers counts it (tied head counted once)
    assert count_parameters(build_model_config("blip2_opt2.7b")).parts["LLM"].total == 2_651_596_800


def test_bad_layouts_fail_naming_the_key(group):
    with pytest.raises(ConfigError, match="llm.tp=3"):
        count_parameters(build_model_config("tiny"), tp=3)
    with pytest.raises(ConfigError, match="llm.pp=5"):
        count_parameters(build_model_config("tiny"), pp=5)


def test_model_info_launcher_prints_the_counts():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # A single-process run in this interpreter publishes its rendezvous in os.environ.
    launch_keys = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch_keys}
    proc = subprocess.run(
        [sys.executable, "launch/model_info.py", "--flavour", "tiny", "blip2_opt2.7b", "--pp", "2", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    tiny, opt = (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    assert (tiny["name"], tiny["total"], tiny["trainable"], tiny["pp"]) == ("tiny", 493_056, 138_304, 2)
    # OPT-2.7B frozen: ViT-g's forward on stage 0 costs as much as ~28 of its decoder layers' training.
    assert [s["layers"] for s in opt["stages"]] == [[0, 3], [3, 32]]
    assert [s["vision_blocks"] for s in opt["stages"]] == [[0, 39], None]
    assert opt["flops_ratio"] == pytest.approx(1.0, abs=0.05)
    assert opt["stages"][0]["train_flops_per_sample"] == pytest.approx(
        opt["stages"][1]["train_flops_per_sample"], rel=0.05
    )
    # The caption job's trained ViT at 364 px, from the job itself.
    proc = subprocess.run(
        [sys.executable, "launch/model_info.py", "--config", "caption_coco_opt2.7b", "--pp", "4", "--json"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    caption = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert caption["pp"] == 4 and caption["flops_ratio"] <= 1.25
    assert sum(s["vision_blocks"] is not None for s in caption["stages"]) == 4
