"""`launch/train.py` end to end: pre-emption, resume, and errors before training.

These run the real command lines users type on the tiny default job and the built-in
dataset. Every parallel layout under the DeepSpeed launcher: test_journey_layouts.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import launcher_free_env

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def _env() -> dict[str, str]:
    return launcher_free_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _step_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(run_dir) if "event" not in r}


def _common(run_dir: Path, sample_root: Path) -> list[str]:
    return [
        f"train.output_dir={run_dir}",
        f"data.sample_root={sample_root}",
        "train.log_interval=1",
        "data.num_workers=1",
    ]


def _train(run: Path, sample_root: Path, extra: list[str]) -> subprocess.Popen:
    args = [
        sys.executable,
        TRAIN,
        *_common(run, sample_root),
        "train.max_steps=10",
        "train.warmup_steps=2",
        *extra,
    ]
    return subprocess.Popen(
        args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO
    )


@pytest.mark.slow
def test_preempted_and_resumed_run_equals_uninterrupted_run(tmp_path, sample):
    straight = tmp_path / "straight"
    proc = _train(straight, sample.root, [])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    reference = _step_losses(straight)
    assert sorted(reference) == list(range(1, 11))

    interrupted = tmp_path / "interrupted"
    proc = _train(interrupted, sample.root, [])
    deadline = time.time() + 300
    while max(_step_losses(interrupted), default=0) < 3:
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be pre-empted"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what SLURM sends before pre-emption
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped_at = max(_step_losses(interrupted))
    assert stopped_at < 10, "the signal was not acted on"
    assert (interrupted / "checkpoints" / "latest").read_text() == f"step_{stopped_at:08d}"

    proc = _train(interrupted, sample.root, [])
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    resumed = _step_losses(interrupted)
    assert sorted(resumed) == list(range(1, 11))
    for step in range(1, 11):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), (step, stopped_at)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN, *args], env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model.llm.tp=3"], "llm.tp=3 must divide llm.num_heads=4"),
        (["train.bogus=1"], "train.bogus"),
        (["--config", "no_such_job"], "neither a file nor a shipped job"),
        (["--ds_config", "missing.json"], "DeepSpeed config not found"),
    ],
)
def test_misconfiguration_fails_before_training_with_a_named_error(args, message):
    proc = _cli(args)
    assert proc.returncode == 2
    assert message in proc.stderr


@pytest.mark.slow
def test_layout_errors_are_reported_before_training(tmp_path):
    proc = _cli([f"train.output_dir={tmp_path}", "model.llm.pp=2"])
    assert proc.returncode == 2
    assert "world size 1 is not divisible" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()
