"""The shell launchers: syntax of every script, the device environments, and the seed-job
runner end to end in CPU mode (2 gloo ranks, tiny job) through a per-device wrapper."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    [
        *REPO.glob("launch/slurm/*.sbatch"),
        *REPO.glob("launch/slurm/*.sh"),
        *REPO.glob("launch/common/*.sh"),
        *REPO.glob("launch/ascend/*.sh"),
        *REPO.glob("launch/gpu/*.sh"),
        *REPO.glob("tests/slurm/*.sh"),
    ]
)
SEED_RUNNER = REPO / "launch" / "common" / "run_seed_job.sh"


def _bash(script: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_expected_scripts_exist():
    names = {p.relative_to(REPO).as_posix() for p in SCRIPTS}
    for expected in (
        "launch/slurm/train.sbatch",
        "launch/slurm/benchmark.sbatch",
        "launch/ascend/env_npu.sh",
        "launch/ascend/train_full_8p.sh",
        "launch/ascend/train_performance_8p.sh",
        "launch/gpu/train_full_8p.sh",
        "launch/gpu/train_performance_8p.sh",
        "launch/common/run_seed_job.sh",
        "tests/slurm/install_slurm.sh",
    ):
        assert expected in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)"
)
def test_shellcheck_warnings():
    # -P SCRIPTDIR: follow `source` directives relative to each script; SC1091: the CANN
    # set_env.sh files it cannot follow exist only on Ascend hosts.
    res = subprocess.run(
        ["shellcheck", "-x", "-P", "SCRIPTDIR", "-S", "warning", "-e", "SC1091", *map(str, SCRIPTS)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_env_npu_without_cann_keeps_going_and_respects_overrides():
    res = _bash(
        "set -euo pipefail; source launch/ascend/env_npu.sh; "
        'echo "$HCCL_CONNECT_TIMEOUT $HCCL_EXEC_TIMEOUT $HCCL_WHITELIST_DISABLE $TASK_QUEUE_ENABLE '
        '$COMBINED_ENABLE $CPU_AFFINITY_CONF $PYTORCH_NPU_ALLOC_CONF $ASCEND_GLOBAL_LOG_LEVEL $DS_ACCELERATOR"; '
        'echo "nounset still on: $([[ $- == *u* ]] && echo yes)"',
        env={"HCCL_CONNECT_TIMEOUT": "99", "DS_ACCELERATOR": ""},
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "99 1800 1 2 1 1 expandable_segments:True 3 npu"
    assert lines[1] == "nounset still on: yes"
    if not Path("/usr/local/Ascend").exists():
        assert "no CANN set_env.sh" in res.stderr


def test_device_env():
    res = _bash(
        'source launch/common/device_env.sh; blip2_device_env cpu; echo "cpu:$DS_ACCELERATOR"; '
        'blip2_device_env gpu 2>/dev/null; echo "gpu:${DS_ACCELERATOR:-unset}"; '
        'blip2_device_env tpu; echo "rc=$?"'
    )
    assert res.stdout.splitlines() == ["cpu:cpu", "gpu:unset", "rc=2"], res.stdout + res.stderr
    assert "unknown device 'tpu'" in res.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode=full"], "--device must be npu, gpu or cpu"),
        (["--device=cpu", "--mode=fast"], "--mode must be full or performance"),
        (["--device=cpu", "--mode=full", "--colour=red"], "unknown option --colour"),
        (["--device=cpu", "--mode=full", "--steps"], "--steps needs a value"),
    ],
)
def test_seed_runner_rejects_bad_arguments(args, message):
    res = subprocess.run(["bash", str(SEED_RUNNER), *args], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and message in res.stderr, res.stderr


def test_seed_runner_help():
    res = subprocess.run(["bash", str(SEED_RUNNER), "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "--data_path=DIR" in res.stdout and "Final Performance" in res.stdout


@pytest.mark.slow
@pytest.mark.dist
def test_performance_script_cpu_end_to_end(tmp_path):
    if not (REPO / "launch" / "train.py").is_file():
        pytest.skip("launch/train.py does not exist yet")
    out = tmp_path / "perf"
    # The GPU wrapper with its device and size overridden: the same path as a real 8-GPU run.
    res = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "gpu" / "train_performance_8p.sh"),
            "--device=cpu",
            "--nproc=2",
            "--config=tiny_stage2",
            "--steps=4",
            "--warmup=1",
            "--batch_size=4",
            f"--output_dir={out}",
            "data.num_workers=0",
            "train.log_interval=1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-6000:]
    fps = re.search(r"^Final Performance images/sec : ([0-9.]+)$", res.stdout, re.M)
    assert fps and float(fps.group(1)) > 0, text[-4000:]
    assert re.search(r"^E2E Training Duration sec : \d+$", res.stdout, re.M), res.stdout
    assert "Final Train Accuracy" not in res.stdout  # performance mode has no evaluation

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["per_device_batch"] == 4
    assert float(fps.group(1)) == pytest.approx(summary["fps_mean"], abs=0.01)
    result = (out / "BLIP2_OPT2.7B_caption_bs4_2p_perf.log").read_text()
    assert (
        "RankSize = 2" in result and "DeviceType = cpu" in result and f"ActualFPS = {fps.group(1)}" in result
    )
    assert (out / "train_perf.log").is_file()
    # The seed-table row for this run closes the output.
    assert re.search(
        r"^\| 2 x cpu \(performance\) \| 2 x cpu \| [0-9.]+ \| \d+ \| 4 \| n/a \| n/a \|$", res.stdout, re.M
    )


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.skipif(shutil.which("java") is None, reason="java missing: pycocoevalcap's tokenizer needs it")
def test_full_script_cpu_end_to_end(tmp_path):
    """The accuracy path: train, the caption evaluation at the end, BLEU@4 / CIDEr reported."""
    if not (REPO / "launch" / "train.py").is_file():
        pytest.skip("launch/train.py does not exist yet")
    out = tmp_path / "full"
    # The Ascend wrapper run on CPU (--device=cpu after its --device=npu wins).
    res = subprocess.run(
        [
            "bash",
            str(REPO / "launch" / "ascend" / "train_full_8p.sh"),
            "--device=cpu",
            "--nproc=2",
            "--config=tiny_stage2",
            "--batch_size=4",
            f"--output_dir={out}",
            "data.num_workers=0",
            "train.max_steps=4",
            "eval.max_samples=8",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-6000:]
    summary = json.loads((out / "summary.json").read_text())
    bleu = re.search(r"^Final Train Accuracy \(BLEU@4\) : ([0-9.]+)$", res.stdout, re.M)
    cider = re.search(r"^Final Train Accuracy \(CIDEr\) : ([0-9.]+)$", res.stdout, re.M)
    assert bleu and cider, res.stdout[-3000:]
    assert float(bleu.group(1)) == pytest.approx(summary["Bleu_4"], abs=1e-4)
    assert float(cider.group(1)) == pytest.approx(summary["CIDEr"], abs=1e-4)
    result = (out / "BLIP2_OPT2.7B_caption_bs4_2p_acc.log").read_text()
    assert f"BLEU4 = {bleu.group(1)}" in result and f"CIDEr = {cider.group(1)}" in result
    assert "DeviceType = cpu" in result
