"""launch/slurm/train.sbatch on a real single-node SLURM cluster (munged + slurmctld + slurmd).

Two jobs of the tiny CPU job, two gloo ranks each (1 node, 2 tasks):
1. a long run that gets the time-limit signal (USR1 to the batch shell, as
   ``#SBATCH --signal=B:USR1@120`` sends it) after its first log step: it must save a
   checkpoint, exit 0 and requeue itself;
2. a resubmission under the same run name (a new job id): it must resume from job 1's
   checkpoint, carry on counting steps, log loss and FPS, run the end-of-training
   evaluation and leave its final checkpoint.
Then benchmark.sbatch measures the same tiny job for a few steps.
tests/test_slurm_multinode.py does the same across two nodes.

Skips, with the reason, where a cluster cannot start here (not root, SLURM or munge not
installed: tests/slurm/install_slurm.sh installs them); fails instead where
BLIP2_REQUIRE_SLURM=1 (CI).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from jobs import (  # noqa: E402
    BENCH_SBATCH,
    assert_completed,
    job_output,
    latest_step,
    start_cluster,
    step_records,
    submit,
    wait_for_steps,
    wait_requeued,
)
from local_cluster import LocalSlurmCluster  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Keep the tiny job small: two ranks share 2 CPU cores.
TINY = ["train.log_interval=1", "data.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    local = start_cluster(tmp_path_factory.mktemp("slurm-cluster"), nodes=1)
    try:
        yield local
    finally:
        local.stop()


def _submit(cluster: LocalSlurmCluster, out_dir: Path, run_name: str, overrides: list[str], **kw) -> int:
    """1 node, 2 tasks (= 2 gloo ranks), the tiny job."""
    return submit(cluster, out_dir, run_name, [*TINY, *overrides], **kw)


def test_train_sbatch_runs_preempts_and_resumes(cluster, tmp_path):
    t0 = time.monotonic()

    # 1. A long run gets the time-limit signal after its first log step: it saves, exits 0
    #    and the batch script requeues it.
    long = "slurm-preempt"
    run_dir = tmp_path / "runs" / long
    job = _submit(cluster, tmp_path, long, ["train.max_steps=2000", "train.save_interval=0"])
    wait_for_steps(cluster, job, run_dir, 1, tmp_path, long)
    # What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit.
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])
    info = wait_requeued(cluster, job, tmp_path, long)
    log = job_output(tmp_path, long, job)
    # Requeued: back to PENDING (SLURM delays the restart ~2 min); we resubmit by hand below
    # instead of waiting, so cancel it.
    assert int(info.get("Restarts", "0")) == 1 and info.get("JobState") == "PENDING", f"{info}\n{log[-6000:]}"
    cluster.run(["scancel", str(job)])
    assert "training step exited with code 0 after SIGUSR1" in log, log[-6000:]
    assert "requeueing job" in log, log[-6000:]
    saved = latest_step(run_dir)
    assert 1 <= saved < 2000, saved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGUSR1" and summary["steps"] == saved, summary
    steps_before = [r["step"] for r in step_records(run_dir)]
    print(f"job 1 (pre-empted at step {saved}) done at {time.monotonic() - t0:.0f}s")

    # 2. A resubmission with the same run name (new job id) resumes from that checkpoint
    #    and finishes like any run: loss and FPS logged, evaluation, final checkpoint.
    job = _submit(cluster, tmp_path, long, [f"train.max_steps={saved + 2}", "train.save_interval=0"])
    log = assert_completed(cluster, cluster.wait_job(job, timeout=240), tmp_path, long, job)
    assert "resuming from" in log and re.search(rf"resumed from \S+ at step {saved}\b", log), log[-6000:]
    assert "loss=" in log and "fps=" in log, log[-4000:]
    records = step_records(run_dir)[len(steps_before) :]
    assert [r["step"] for r in records] == [saved + 1, saved + 2], (steps_before, records)
    assert all("loss" in r and "fps" in r for r in records), records
    assert latest_step(run_dir) == saved + 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == saved + 2 and "CIDEr" in summary, summary  # evaluated at the end
    print(f"job 2 (resumed) done at {time.monotonic() - t0:.0f}s")


def test_benchmark_sbatch(cluster, tmp_path):
    name = "slurm-bench"
    job = _submit(cluster, tmp_path, name, [], script=BENCH_SBATCH, STEPS="3", WARMUP="1")
    log = assert_completed(cluster, cluster.wait_job(job, timeout=240), tmp_path, name, job)
    figures = json.loads((tmp_path / "runs" / f"{name}-{job}" / "benchmark.json").read_text())
    assert "FPS (images/s, global)" in log, log[-4000:]
    assert figures["world_size"] == 2, figures  # both SLURM tasks' ranks took part
