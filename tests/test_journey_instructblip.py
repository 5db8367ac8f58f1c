"""InstructBLIP the way a user runs it, on a tiny LLaMA-family model and the built-in data.

The shipped ``instruct_vicuna7b`` job at tiny size (``journeys.tiny_overrides``: the tiny
instruction-aware LLaMA, the built-in caption and VQA training shards) trains through
``launch/train.py`` under the DeepSpeed launcher on its two sources, mixed by the square root of
their sizes, each sample with an instruction drawn from the shipped templates, and validates on
the held-out VQA questions while it trains. Then the run is evaluated with the shipped
zero-shot VQA job, answers a question through ``launch/predict.py`` and a piped conversation
through ``launch/chat.py``. The job as shipped (TP 2, on 2 ranks) starts from the same loss.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from journeys import launch, piped_chat, records, step_records, summary, tiny_overrides, train_job

from blip2_megatron.config import load_job_config

pytestmark = [pytest.mark.slow, pytest.mark.journey]

JOB = "instruct_vicuna7b"
COMMON = (
    "train.log_interval=5",
    "train.warmup_steps=5",
    "train.lr=1e-3",
    "eval.max_samples=16",
    "eval.num_beams=2",
)


def _losses(run: Path) -> list[float]:
    return [record["loss"] for _, record in sorted(step_records(run).items())]


@pytest.fixture(scope="module")
def instruct_runs(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("instructblip")
    runs = {"tp1": root / "tp1", "tp2": root / "tp2"}
    overrides = tiny_overrides(JOB, sample)
    train_job(
        JOB, runs["tp1"], *overrides, *COMMON, "model.llm.tp=1", "train.max_steps=40", "eval.interval=20"
    )
    # As shipped: TP 2 on 2 ranks (DP 1, so the same batches as the TP 1 run).
    train_job(JOB, runs["tp2"], *overrides, *COMMON, "train.max_steps=5", "eval.enabled=false", nproc=2)
    return runs


def test_instruction_tuning_trains_the_qformer_on_two_sources_and_validates(instruct_runs):
    run = instruct_runs["tp1"]
    ran, real = load_job_config(str(run / "config.yaml")), load_job_config(JOB)
    assert ran.model.instruction_aware and ran.model.llm.hf_family == real.model.llm.hf_family == "llama"
    assert ran.data.source_tasks == ["caption", "vqa"] and ran.data.mix_weights == "sqrt"
    stats = summary(run)
    assert stats["data_sources"] == 2 and stats["steps"] == 40, stats
    losses = _losses(run)
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # Validation on the held-out VQA questions at steps 20 and 40, scored by answer type.
    evals = [r for r in records(run) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [20, 40], evals
    assert all(r["num_evaluated"] == 16 and {"yes/no", "number", "other"} <= set(r) for r in evals), evals


def test_the_shipped_tensor_parallel_layout_starts_from_the_same_loss(instruct_runs):
    tp1, tp2 = _losses(instruct_runs["tp1"])[0], _losses(instruct_runs["tp2"])[0]
    ran = load_job_config(str(instruct_runs["tp2"] / "config.yaml"))
    assert (ran.tp, ran.pp) == (2, 1) and ran.model.instruction_aware
    assert abs(tp1 - tp2) <= 1e-4 * abs(tp1), (tp1, tp2)


def _zero_shot_vqa(run: Path, out: Path, sample, tp: int) -> list[dict]:
    """The shipped zero-shot VQA job on ``run`` with ``tp`` TP ranks; its answers by question id."""
    name = "vqa_zeroshot_instructblip_vicuna7b"
    launch(
        "evaluate.py",
        "--config",
        name,
        "--output",
        str(out),
        *tiny_overrides(name, sample),
        f"model.init_checkpoint={run}",
        f"model.llm.tp={tp}",
        "eval.max_samples=16",
        "eval.num_beams=3",
        nproc=tp if tp > 1 else 0,
    )
    metrics = json.loads((out / "eval" / "metrics_vqa.json").read_text())
    assert metrics["num_evaluated"] == 16 and {"overall", "yes/no", "number", "other"} <= set(metrics)
    answers = json.loads((out / "eval" / "vqa_answers.json").read_text())
    return sorted(answers, key=lambda a: a["question_id"])


def test_the_run_answers_the_zero_shot_vqa_job_predict_and_chat(instruct_runs, sample, tmp_path):
    run = instruct_runs["tp1"]
    answers = _zero_shot_vqa(run, tmp_path / "vqa", sample, tp=1)
    # At TP 2 each rank encodes half of the images with their instructions: the same answers.
    assert _zero_shot_vqa(run, tmp_path / "vqa_tp2", sample, tp=2) == answers

    image = str(sample.image_root / "test" / "100001.jpg")
    answer = launch(
        "predict.py", "--model", str(run), "--image", image, "--question", "what color is the shape"
    )
    lines = [line for line in answer.stdout.splitlines() if line.startswith(image)]
    assert len(lines) == 1, answer.stdout
    for model in (run, instruct_runs["tp2"]):  # a TP 2 run chats in one process too
        chat = piped_chat(model, image, ["what is in the picture", "and what color is it"])
        assert len(chat.stdout.splitlines()) == 2, chat.stdout
