"""launch/slurm/train.sbatch on a real single-node SLURM cluster (munged + slurmctld + slurmd).

Three jobs of the tiny CPU job, two gloo ranks each (1 node, 2 tasks):
1. a short run: finishes, logs loss and FPS, leaves a checkpoint;
2. a long run that gets the time-limit signal (USR1 to the batch shell, as
   ``#SBATCH --signal=B:USR1@120`` sends it) after its first log step: it must save a
   checkpoint, exit 0 and requeue itself;
3. a resubmission under the same run name (a new job id): it must resume from job 2's
   checkpoint and carry on counting steps.
Then benchmark.sbatch measures the same tiny job for a few steps.

Skips, with the reason, where a cluster cannot start here (not root, SLURM or munge not
installed: tests/slurm/install_slurm.sh installs them).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "slurm"))
from local_cluster import FINISHED_STATES, ClusterUnavailable, LocalSlurmCluster, why_unavailable  # noqa: E402

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
BENCH_SBATCH = REPO / "launch" / "slurm" / "benchmark.sbatch"
TRAIN_ENTRY = "launch/train.py"
# Keep the tiny job small: two ranks share 2 CPU cores.
TINY = ["train.log_interval=1", "data.batch_size=4", "data.num_workers=0"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_unavailable()
    if reason is None and not (REPO / TRAIN_ENTRY).is_file():
        reason = f"{TRAIN_ENTRY} does not exist yet"
    if reason:
        print(f"\nSLURM test skipped: {reason}", file=sys.stderr)
        pytest.skip(reason)
    local = LocalSlurmCluster(root=tmp_path_factory.mktemp("slurm-cluster"), cpus=os.cpu_count() or 2)
    try:
        local.start()
    except ClusterUnavailable as err:
        print(f"\nSLURM test skipped: local cluster did not start: {err}", file=sys.stderr)
        pytest.skip(f"local SLURM cluster did not start: {str(err).splitlines()[0]}")
    try:
        yield local
    finally:
        local.stop()


def _submit(
    cluster: LocalSlurmCluster,
    out_dir: Path,
    run_name: str,
    overrides: list[str],
    script: Path = SBATCH,
    **knobs: str,
) -> int:
    """sbatch a template in CPU mode: 1 node, 2 tasks (= 2 gloo ranks), the tiny job."""
    env = {
        "DEVICE": "cpu",
        "JOB_CONFIG": "tiny_stage2",
        "DS_CONFIG": "ds_configs/zero2.json",
        "OUTPUT_ROOT": str(out_dir / "runs"),
        "TRAIN_ENTRY": TRAIN_ENTRY,
        **knobs,
    }
    # Command-line options override the template's GPU-cluster #SBATCH defaults.
    args = [
        f"--job-name={run_name}",
        "--nodes=1",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--gpus-per-node=0",
        "--time=10",
        f"--output={out_dir}/%x-%j.out",
        str(script),
        *TINY,
        *overrides,
    ]
    return cluster.sbatch(args, env=env, cwd=REPO)


def _job_output(out_dir: Path, run_name: str, job_id: int) -> str:
    path = out_dir / f"{run_name}-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no job output at {path})"


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_records(run_dir: Path) -> list[dict]:
    return [r for r in _records(run_dir) if "step" in r and r.get("event") != "summary"]


def _latest_step(run_dir: Path) -> int:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag).is_dir(), f"latest names {tag}, which is not a directory"
    return int(re.search(r"(\d+)$", tag).group(1))


def _assert_completed(cluster, info: dict, out_dir: Path, run_name: str, job_id: int) -> str:
    log = _job_output(out_dir, run_name, job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')}\n{log[-6000:]}\n{cluster.daemon_logs()}"
    )
    return log


def test_train_sbatch_runs_preempts_and_resumes(cluster, tmp_path):
    t0 = time.monotonic()

    # 1. A short run finishes with loss, FPS and a checkpoint.
    short = "slurm-short"
    job = _submit(cluster, tmp_path, short, ["train.max_steps=3"])
    log = _assert_completed(cluster, cluster.wait_job(job, timeout=240), tmp_path, short, job)
    run_dir = tmp_path / "runs" / short
    assert "loss=" in log and "fps=" in log, log[-4000:]
    records = _step_records(run_dir)
    assert records and records[-1]["step"] == 3, records
    assert all("loss" in r and "fps" in r for r in records), records
    assert _latest_step(run_dir) == 3
    print(f"job 1 (short run) done at {time.monotonic() - t0:.0f}s")

    # 2. A long run gets the time-limit signal after its first log step: it saves, exits 0
    #    and the batch script requeues it.
    long = "slurm-preempt"
    run_dir = tmp_path / "runs" / long
    job = _submit(cluster, tmp_path, long, ["train.max_steps=2000", "train.save_interval=0"])
    deadline = time.monotonic() + 240
    while not _step_records(run_dir):
        info = cluster.job_info(job)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job} ended before logging a step: {info}\n{_job_output(tmp_path, long, job)[-6000:]}"
        )
        assert time.monotonic() < deadline, (
            f"no log step after 240s\n{_job_output(tmp_path, long, job)[-6000:]}"
        )
        time.sleep(0.3)
    # What `#SBATCH --signal=B:USR1@120` does 120 s before the time limit.
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job)])

    # The job is done with this run once it has been requeued (Restarts counts it) and has
    # settled in PENDING, or once it ended any other way (which the asserts below report).
    deadline = time.monotonic() + 180
    while True:
        info = cluster.job_info(job)
        requeued = int(info.get("Restarts", "0")) >= 1
        if (requeued and info.get("JobState") == "PENDING") or (
            not requeued and info.get("JobState") in FINISHED_STATES
        ):
            break
        assert time.monotonic() < deadline, (
            f"job {job} not requeued 180s after USR1: {info}\n{_job_output(tmp_path, long, job)[-6000:]}"
        )
        time.sleep(0.5)
    log = _job_output(tmp_path, long, job)
    # Requeued: back to PENDING (SLURM delays the restart ~2 min); we resubmit by hand below
    # instead of waiting, so cancel it.
    assert int(info.get("Restarts", "0")) == 1 and info.get("JobState") == "PENDING", f"{info}\n{log[-6000:]}"
    cluster.run(["scancel", str(job)])
    assert "training step exited with code 0 after SIGUSR1" in log, log[-6000:]
    assert "requeueing job" in log, log[-6000:]
    saved = _latest_step(run_dir)
    assert 1 <= saved < 2000, saved
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] == "SIGUSR1" and summary["steps"] == saved, summary
    steps_before = [r["step"] for r in _step_records(run_dir)]
    print(f"job 2 (pre-empted at step {saved}) done at {time.monotonic() - t0:.0f}s")

    # 3. A resubmission with the same run name (new job id) resumes from that checkpoint.
    job = _submit(cluster, tmp_path, long, [f"train.max_steps={saved + 2}", "train.save_interval=0"])
    log = _assert_completed(cluster, cluster.wait_job(job, timeout=240), tmp_path, long, job)
    assert "resuming from" in log and re.search(rf"resumed from \S+ at step {saved}\b", log), log[-6000:]
    steps_after = [r["step"] for r in _step_records(run_dir)][len(steps_before) :]
    assert steps_after and steps_after[0] == saved + 1 and steps_after[-1] == saved + 2, (
        steps_before,
        steps_after,
    )
    assert _latest_step(run_dir) == saved + 2
    print(f"job 3 (resumed) done at {time.monotonic() - t0:.0f}s")


def test_benchmark_sbatch(cluster, tmp_path):
    name = "slurm-bench"
    job = _submit(cluster, tmp_path, name, [], script=BENCH_SBATCH, STEPS="3", WARMUP="1")
    log = _assert_completed(cluster, cluster.wait_job(job, timeout=240), tmp_path, name, job)
    figures = json.loads((tmp_path / "runs" / f"{name}-{job}" / "benchmark.json").read_text())
    assert "FPS (images/s, global)" in log, log[-4000:]
    assert figures["world_size"] == 2, figures  # both SLURM tasks' ranks took part
