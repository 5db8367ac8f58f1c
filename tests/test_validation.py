"""Validation during training (``eval.interval``): evaluated on every DP rank, logged, best kept.

As LAVIS does: the job's evaluation runs every N steps (or epochs), its metrics go to the
log, and the checkpoint with the best task metric (CIDEr + BLEU-4, VQA accuracy, mean text
recall) is kept as ``best`` next to ``latest``, never pruned; a resumed run remembers it.
"""

from __future__ import annotations

import json

import pytest
from journeys import DS_CONFIGS, launch, records

pytestmark = [pytest.mark.slow, pytest.mark.journey]


def _train(run, sample, *overrides: str, nproc: int = 0):
    return launch(
        "train.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        f"train.output_dir={run}",
        f"data.sample_root={sample.root}",
        "data.num_workers=1",
        "eval.task=vqa",
        "eval.max_samples=16",
        "eval.num_beams=1",
        "eval.interval=10",
        "train.log_interval=5",
        "train.save_interval=5",
        "train.keep_last=1",
        *overrides,
        nproc=nproc,
    )


def test_periodic_validation_keeps_the_best_checkpoint_and_a_resume_remembers_it(sample, tmp_path):
    run = tmp_path / "run"
    _train(run, sample, "train.max_steps=30", "eval.enabled=true", nproc=2)
    evals = [r for r in records(run) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]  # every 10 steps, and the final one
    assert all(r["num_evaluated"] == 16 and "yes/no" in r for r in evals)
    best = max(evals[:-1], key=lambda r: r["agg_metric"])
    final = evals[-1]
    if final["agg_metric"] > best["agg_metric"]:
        best = final
    checkpoints = run / "checkpoints"
    kept = json.loads((checkpoints / "best").read_text())
    assert (
        kept["tag"] == f"step_{best['step']:08d}"
        and (checkpoints / kept["tag"] / "trainer_state.json").is_file()
    )
    assert (checkpoints / "latest").read_text() == "step_00000030"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best"]["step"] == best["step"]

    # Resumed with a longer schedule: the best so far is remembered (a worse one does not replace it).
    _train(run, sample, "train.max_steps=40", "eval.enabled=false")
    later = [r for r in records(run) if r.get("event") == "eval" and r["step"] > 30]
    assert [r["step"] for r in later] == []  # step 40 ends the run: evaluated only with eval.enabled
    _train(run, sample, "train.max_steps=60", "eval.enabled=false")
    later = [r for r in records(run) if r.get("event") == "eval" and r["step"] > 40]
    assert [r["step"] for r in later] == [50]
    kept = json.loads((checkpoints / "best").read_text())
    expected = max([best, *later], key=lambda r: r["agg_metric"])
    assert (kept["step"], kept["metric"]) == (expected["step"], pytest.approx(expected["agg_metric"]))
    assert (checkpoints / kept["tag"]).is_dir()  # never pruned (keep_last=1)


def test_epoch_interval_validates_at_epoch_ends(sample, tmp_path):
    run = tmp_path / "run"
    # 4000 built-in samples / batch 200 = 20 steps per epoch.
    _train(
        run,
        sample,
        "eval.interval_unit=epochs",
        "eval.interval=1",
        "data.batch_size=200",
        "train.max_steps=41",
        "eval.enabled=false",
    )
    assert [r["step"] for r in records(run) if r.get("event") == "eval"] == [20, 40]
