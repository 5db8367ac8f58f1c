"""BLIP-2 FlanT5 end to end, as a user runs it, at tiny size on the built-in data.

Stage 2 by prefix language modelling (``stage2_flant5xl``) -> COCO caption fine-tuning from
that run (``caption_coco_flant5xl``, ViT trained at the larger size) -> caption evaluation
-> zero-shot VQA with the shipped evaluation job (``vqa_zeroshot_flant5xl``) -> prediction
and piped chat; and the caption job at TP 2, whose first loss equals the TP 1 run's.
Every run trains a tiny T5 (encoder-decoder), not a decoder-only stand-in.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from journeys import launch, piped_chat, step_records, summary, tiny_overrides, train_job

from blip2_megatron.config import load_job_config

pytestmark = [pytest.mark.slow, pytest.mark.journey]


def _train(config: str, run: Path, sample, *overrides: str, nproc: int = 1):
    return train_job(config, run, *tiny_overrides(config, sample), *overrides, nproc=nproc)


def _losses(run: Path) -> list[float]:
    return [record["loss"] for _, record in sorted(step_records(run).items())]


@pytest.fixture(scope="module")
def flant5_runs(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("flant5_chain")
    runs = {name: root / name for name in ("stage2", "caption")}
    common = ("train.log_interval=5", "train.warmup_steps=5", "train.lr=1e-3", "model.init_checkpoint=")
    _train("stage2_flant5xl", runs["stage2"], sample, *common, "train.max_steps=40", "train.save_interval=20")
    _train(
        "caption_coco_flant5xl",
        runs["caption"],
        sample,
        *common,
        f"model.init_checkpoint={runs['stage2']}",
        "train.max_steps=30",
        "eval.split=val",
        "eval.max_samples=8",
        "eval.num_beams=2",
    )
    return runs


def test_stage2_trains_a_t5_by_prefix_language_modelling(flant5_runs):
    run = flant5_runs["stage2"]
    ran = load_job_config(str(run / "config.yaml"))
    assert ran.model.llm.arch == "t5" and ran.model.llm.hf_family == "t5" and ran.model.prefix_lm
    losses = _losses(run)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_caption_finetune_continues_from_stage2_and_evaluates(flant5_runs):
    run = flant5_runs["caption"]
    ran = load_job_config(str(run / "config.yaml"))
    assert ran.model.llm.arch == "t5" and ran.model.prompt == "a photo of" and not ran.model.vision.freeze
    stats = summary(run)
    assert stats["num_evaluated"] == 8 and stats["Bleu_4"] >= 0, stats
    losses = _losses(run)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses


def test_caption_evaluation_and_the_zero_shot_vqa_job(flant5_runs, sample, tmp_path):
    run = flant5_runs["caption"]
    launch("evaluate.py", "--checkpoint", str(run), "eval.split=test", "eval.max_samples=8")
    captions = json.loads((run / "eval" / "metrics_caption_test.json").read_text())
    assert captions["num_evaluated"] == 8 and "CIDEr" in captions

    out = tmp_path / "vqa"
    launch(
        "evaluate.py",
        "--config",
        "vqa_zeroshot_flant5xl",
        "--output",
        str(out),
        *tiny_overrides("vqa_zeroshot_flant5xl", sample),
        f"model.init_checkpoint={flant5_runs['stage2']}",
        "eval.max_samples=16",
        "eval.num_beams=3",
    )
    metrics = json.loads((out / "eval" / "metrics_vqa.json").read_text())
    assert metrics["num_evaluated"] == 16 and {"overall", "yes/no", "number", "other"} <= set(metrics)
    answers = json.loads((out / "eval" / "vqa_answers.json").read_text())
    assert len(answers) == 16 and all(isinstance(a["answer"], str) for a in answers)


def test_predict_and_chat_with_the_caption_run(flant5_runs, sample):
    run = flant5_runs["caption"]
    image = str(sample.image_root / "test" / "100001.jpg")
    out = launch("predict.py", "--model", str(run), "--image", image, "--question", "what color is the shape")
    lines = [line for line in out.stdout.splitlines() if line.startswith(image)]
    assert len(lines) == 1 and lines[0].split("\t")[1].strip(), out.stdout
    chat = piped_chat(run, image, ["what is in the picture", "and what color is it"])
    answers = [line for line in chat.stdout.splitlines() if line.strip()]
    assert len(answers) >= 2, chat.stdout  # both questions answered, the second with the first in context


def test_tensor_parallel_2_caption_job_starts_where_tp1_does(flant5_runs, sample, tmp_path):
    """TP 2 splits T5's heads (and its relative bias table) over 2 ranks: the same first loss."""
    run = tmp_path / "tp2"
    _train(
        "caption_coco_flant5xl",
        run,
        sample,
        "train.log_interval=1",
        "train.warmup_steps=5",
        "train.lr=1e-3",
        f"model.init_checkpoint={flant5_runs['stage2']}",
        "model.llm.tp=2",
        "train.max_steps=3",
        "eval.enabled=false",
        nproc=2,
    )
    ran = load_job_config(str(run / "config.yaml"))
    assert ran.model.llm.tp == 2 and ran.model.llm.arch == "t5"
    tp2, tp1 = step_records(run), step_records(flant5_runs["caption"])
    assert sorted(tp2) == [1, 2, 3]
    assert abs(tp2[1]["loss"] - tp1[1]["loss"]) < 1e-4 * max(1.0, abs(tp1[1]["loss"])), (tp2[1], tp1[1])
