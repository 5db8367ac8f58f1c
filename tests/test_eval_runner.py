"""launch/evaluate.py on the VQAv2 and stage-1 retrieval paths (captions: see test_learning.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import launcher_free_env

REPO = Path(__file__).resolve().parents[1]


def _evaluate(args: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "launch/evaluate.py", *args],
        env=launcher_free_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    from blip2_megatron.data.sample_dataset import ensure_sample_dataset

    return ensure_sample_dataset(tmp_path_factory.mktemp("data") / "sample")


@pytest.mark.slow
def test_vqa_evaluation_writes_answers_and_official_accuracy(tmp_path, sample):
    val = json.loads(Path(sample.val_annotation).read_text())
    questions, annotations = [], []
    for index, item in enumerate(val):
        colour = next(
            word
            for word in item["caption"][0].split()
            if word in {"red", "green", "blue", "yellow", "purple", "orange"}
        )
        questions.append(
            {
                "image_id": item["image_id"],
                "question": "What colour is the shape?",
                "question_id": index,
                "image": item["image"],
            }
        )
        annotations.append(
            {"question_id": index, "answer_type": "other", "answers": [{"answer": colour}] * 10}
        )
    # LAVIS's evaluation list format: answers inline with the questions.
    questions_path = tmp_path / "questions.json"
    questions_path.write_text(
        json.dumps(
            [
                dict(q, answer=[colour["answer"] for colour in a["answers"]])
                for q, a in zip(questions, annotations)
            ]
        )
    )
    out = tmp_path / "out"
    _evaluate(
        [
            "--config",
            "tiny_stage2",
            "--output",
            str(out),
            "eval.task=vqa",
            f"data.vqa_questions={questions_path}",
            f"data.image_root={sample.image_root}",
            f"data.sample_root={sample.root}",
            "eval.num_beams=2",
            "eval.max_new_tokens=3",
        ]
    )
    answers = json.loads((out / "eval" / "vqa_answers.json").read_text())
    assert sorted(a["question_id"] for a in answers) == list(range(len(val)))
    metrics = json.loads((out / "eval" / "metrics_vqa.json").read_text())
    assert 0.0 <= metrics["overall"] <= 100.0


@pytest.mark.slow
def test_stage1_retrieval_evaluation_reports_recall(tmp_path, sample):
    out = tmp_path / "out"
    _evaluate(
        [
            "--config",
            "tiny_stage1",
            "--output",
            str(out),
            "eval.task=retrieval",
            "eval.k_test=8",
            "eval.max_samples=24",
            f"data.sample_root={sample.root}",
        ]
    )
    metrics = json.loads((out / "eval" / "metrics_retrieval_val.json").read_text())
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"):
        assert 0.0 <= metrics[key] <= 100.0
    assert metrics["txt_r10"] >= metrics["txt_r1"] and metrics["img_r10"] >= metrics["img_r1"]
