"""What the SLURM tests share: the cluster fixture's start-or-skip rule, submitting the
sbatch templates in CPU mode, and reading a run's job log, log.jsonl and checkpoints."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_cluster import FINISHED_STATES, ClusterUnavailable, LocalSlurmCluster, why_unavailable  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
BENCH_SBATCH = REPO / "launch" / "slurm" / "benchmark.sbatch"
TRAIN_ENTRY = "launch/train.py"
#: Set (CI does, in .ci/run) to turn "cannot start a SLURM cluster here" from a skip into a
#: failure: there, a missing SLURM or a namespace that cannot be made is a broken machine.
REQUIRE_ENV = "BLIP2_REQUIRE_SLURM"


def cluster_unavailable(reason: str) -> None:
    """Skip the module's tests with ``reason``, or fail them where SLURM is required."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the SLURM cluster cannot run here: {reason}", pytrace=False)
    print(f"\nSLURM test skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


def start_cluster(root: Path, nodes: int) -> LocalSlurmCluster:
    """A started cluster of ``nodes`` nodes in ``root``, or a skip/failure saying why not."""
    reason = why_unavailable(nodes)
    if reason is None and not (REPO / TRAIN_ENTRY).is_file():
        reason = f"{TRAIN_ENTRY} does not exist yet"
    if reason:
        cluster_unavailable(reason)
    cluster = LocalSlurmCluster(root=root, cpus=os.cpu_count() or 2, nodes=nodes)
    try:
        cluster.start()
    except ClusterUnavailable as err:
        # start() has already stopped whatever it had started.
        cluster_unavailable(f"local SLURM cluster ({nodes} node(s)) did not start: {err}")
    return cluster


def submit(
    cluster: LocalSlurmCluster,
    out_dir: Path,
    run_name: str,
    overrides: list[str],
    *,
    script: Path = SBATCH,
    nodes: int = 1,
    tasks_per_node: int = 2,
    cpus_per_task: int = 1,
    **knobs: str,
) -> int:
    """sbatch a template in CPU mode with the tiny job; ``knobs`` are its environment knobs."""
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
        f"--nodes={nodes}",
        f"--ntasks-per-node={tasks_per_node}",
        f"--cpus-per-task={cpus_per_task}",
        "--gpus-per-node=0",
        "--time=10",
        f"--output={out_dir}/%x-%j.out",
        str(script),
        *overrides,
    ]
    return cluster.sbatch(args, env=env, cwd=REPO)


def job_output(out_dir: Path, run_name: str, job_id: int) -> str:
    path = out_dir / f"{run_name}-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else f"(no job output at {path})"


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(run_dir: Path) -> list[dict]:
    """The training steps' records in order (evaluation and summary events left out)."""
    return [r for r in records(run_dir) if "step" in r and "event" not in r]


def latest_step(run_dir: Path) -> int:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag).is_dir(), f"latest names {tag}, which is not a directory"
    return int(re.search(r"(\d+)$", tag).group(1))


def assert_completed(cluster, info: dict, out_dir: Path, run_name: str, job_id: int) -> str:
    """The job ended COMPLETED with exit 0; returns its log."""
    log = job_output(out_dir, run_name, job_id)
    assert info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0", (
        f"job {job_id}: {info.get('JobState')} exit {info.get('ExitCode')}\n{log[-6000:]}\n{cluster.daemon_logs()}"
    )
    return log


def wait_for_steps(
    cluster, job_id: int, run_dir: Path, count: int, out_dir: Path, run_name: str, timeout: float = 240
) -> list[dict]:
    """Poll until log.jsonl holds ``count`` step records while the job runs; returns them."""
    deadline = time.monotonic() + timeout
    while len(found := step_records(run_dir)) < count:
        info = cluster.job_info(job_id)
        assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), (
            f"job {job_id} ended before logging step record {count}: {info}\n"
            f"{job_output(out_dir, run_name, job_id)[-6000:]}"
        )
        assert time.monotonic() < deadline, (
            f"job {job_id}: fewer than {count} step records after {timeout:.0f}s\n"
            f"{job_output(out_dir, run_name, job_id)[-6000:]}"
        )
        time.sleep(0.3)
    return found


def wait_requeued(cluster, job_id: int, out_dir: Path, run_name: str, timeout: float = 180) -> dict:
    """Poll until the job is back in PENDING after a requeue (``Restarts`` counts it), or has
    ended without one (which the caller's asserts then report); returns its info."""
    deadline = time.monotonic() + timeout
    while True:
        info = cluster.job_info(job_id)
        requeued = int(info.get("Restarts", "0")) >= 1
        if (requeued and info.get("JobState") == "PENDING") or (
            not requeued and info.get("JobState") in FINISHED_STATES
        ):
            return info
        assert time.monotonic() < deadline, (
            f"job {job_id} not requeued after {timeout:.0f}s: {info}\n"
            f"{job_output(out_dir, run_name, job_id)[-6000:]}"
        )
        time.sleep(0.5)
