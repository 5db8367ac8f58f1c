"""The shipped stage-1 job, trained at tiny size and evaluated as a user would.

``stage1`` pretrains on shards only, so its evaluation data is its own: COCO Karpathy
retrieval (the 5k test split, ITC top-128 re-ranked by ITM, as LAVIS evaluates). Here the
job is trained through the DeepSpeed launcher with :func:`journeys.tiny_overrides` (which
point the annotations at the built-in data's Karpathy-format splits) and its run evaluated
with ``launch/evaluate.py``: the recall figures come out, the shipped job reaches for the
Karpathy test file, and a job without an annotation is told which key is missing.
"""

from __future__ import annotations

import json

import pytest
from journeys import DS_CONFIGS, launch, step_records, tiny_overrides

from blip2_megatron.config import load_job_config

pytestmark = [pytest.mark.slow, pytest.mark.journey]

RECALLS = ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]
EVAL_IMAGES = 24  # of the built-in test split's 150: each image's 5 captions make 120 texts


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, sample):
    run = tmp_path_factory.mktemp("stage1") / "stage1"
    launch(
        "train.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        "--config",
        "stage1",
        *tiny_overrides("stage1", sample),
        f"train.output_dir={run}",
        "train.max_steps=3",
        "train.log_interval=1",
        nproc=2,
    )
    return run


def test_shipped_stage1_names_coco_karpathy_retrieval():
    job = load_job_config("stage1")
    assert job.eval.task == "retrieval" and job.eval.split == "test" and job.eval.k_test == 128
    assert job.data.test_annotation.endswith("coco_karpathy_test.json") and job.data.image_root
    assert job.data.val_annotation.endswith("coco_karpathy_val.json")


def test_stage1_run_is_evaluated_with_its_shipped_retrieval_settings(stage1_run):
    assert sorted(step_records(stage1_run)) == [1, 2, 3]
    ran = load_job_config(str(stage1_run / "config.yaml"))
    assert (ran.eval.task, ran.eval.split, ran.eval.k_test) == ("retrieval", "test", 128)

    proc = launch("evaluate.py", "--checkpoint", str(stage1_run), f"eval.max_samples={EVAL_IMAGES}")
    metrics = json.loads((stage1_run / "eval" / "metrics_retrieval_test.json").read_text())
    printed = json.loads(proc.stdout[proc.stdout.index("{") :])  # what the user sees is what was saved
    assert {key: printed[key] for key in RECALLS} == {key: metrics[key] for key in RECALLS}, printed
    assert metrics["num_evaluated"] == EVAL_IMAGES and metrics["num_missing_images"] == 0, metrics
    for key in RECALLS:
        assert 0 <= metrics[key] <= 100, (key, metrics)
    assert metrics["img_r10"] >= metrics["img_r1"] and metrics["txt_r10"] >= metrics["txt_r1"], metrics
    assert metrics["agg_metric"] == pytest.approx(metrics["txt_r_mean"]), metrics


def test_shipped_stage1_evaluation_reads_the_karpathy_test_split(stage1_run, sample):
    """Without the tiny data overrides the run's evaluation opens the shipped COCO test file."""
    model_only = [o for o in tiny_overrides("stage1", sample) if o.startswith("model.")]
    proc = launch(
        "evaluate.py", "--config", "stage1", "--checkpoint", str(stage1_run), *model_only, check=False
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "coco_karpathy_test.json" in proc.stderr, proc.stderr[-2000:]


def test_evaluation_without_an_annotation_names_the_key_and_the_task(stage1_run):
    proc = launch("evaluate.py", "--checkpoint", str(stage1_run), "data.test_annotation=", check=False)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "data.test_annotation is required for retrieval evaluation" in proc.stderr, proc.stderr[-2000:]
    assert "caption evaluation" not in proc.stderr, proc.stderr[-2000:]
