"""``bash launch/gpu/validate.sh --cpu`` from a fresh venv, the way a GPU machine meets it.

A GPU machine has torch, transformers, pillow and pytest and no internet. The test builds
the wheels folder with the documented recipe (``launch/gpu/make_wheels.sh``, for this
Python), makes a venv with ``python3 -m venv``, installs torch 2.13.0 (the CPU build pip
finds in this machine's find-links, as install.sh gets it) and, as a separate "GPU machine
stand-in" step, transformers, pillow and pytest from the registry at constraints.txt's
versions. Everything else (deepspeed, megatron-core, webdataset and their dependencies,
the package itself) validate.sh must install from the wheels folder. Every part must pass
and the JSON file must hold the figures. Then, with the package uninstalled, a launch
script run from elsewhere must still import it from the checkout.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.journey]

REPO = Path(__file__).resolve().parents[1]
PARTS = ["caption", "parity", "tests", "train", "resume", "tp2", "pp2", "benchmark", "baseline"]
GPU_MACHINE_STAND_IN = ["transformers", "pillow", "pytest"]


def run(command: list[str], timeout: int, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, command))} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
        f"\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without launcher rank variables or a Python path into the checkout."""
    import os

    env = dict(os.environ, **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with torch, then the GPU machine stand-in (transformers, pillow, pytest)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(root)], 120)
    python = root / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], 600)
    # The GPU machine stand-in, not what validate.sh installs: the base a GPU machine has.
    constraints = str(REPO / "constraints.txt")
    run([str(python), "-m", "pip", "install", "-q", "-c", constraints, *GPU_MACHINE_STAND_IN], 600)
    return python


def test_validate_cpu_mode_passes_from_a_fresh_venv(venv, tmp_path):
    wheels = tmp_path / "wheels"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    run(["bash", str(REPO / "launch/gpu/make_wheels.sh"), "--python-version", version, str(wheels)], 300)
    names = sorted(p.name for p in wheels.glob("*.whl"))
    assert any(n.startswith("deepspeed-") and n.endswith("py3-none-any.whl") for n in names), names
    assert not [n for n in names if re.match(r"(torch|nvidia)", n)], names

    assert subprocess.run([str(venv), "-c", "import deepspeed"], capture_output=True).returncode != 0
    proc = run(
        ["bash", str(REPO / "launch/gpu/validate.sh"), "--cpu", "2"],
        1800,
        cwd=tmp_path,
        env=clean_env(PYTHON=str(venv), WHEELS=str(wheels), TMPDIR=str(tmp_path)),
    )
    out = proc.stdout
    print(out[out.rfind("[validate] summary") :])
    (result_path,) = tmp_path.glob("blip2-validate-cpu.*/validate.json")
    result = json.loads(result_path.read_text())
    assert result["mode"] == "cpu" and result["passed"], result
    assert [name for name in result["parts"]] == PARTS
    statuses = {name: part["status"] for name, part in result["parts"].items()}
    assert statuses == {name: "ok" for name in PARTS}, statuses
    figures = {name: part["figures"] for name, part in result["parts"].items()}
    assert figures["caption"]["ours"]["fps"] > 0 and "profile" in figures["caption"]
    assert figures["baseline"]["ratios"]["speed"] > 0
    assert figures["parity"]["greedy_tokens_identical"] and figures["parity"]["loss_rel_diff"] < 1e-4
    assert figures["tests"]["applicable"] is False and figures["tests"]["errors"] == 0
    assert figures["train"]["steps"] == 6 and figures["resume"]["resumed_from"] == 6
    assert (figures["tp2"]["tp"], figures["pp2"]["pp"]) == (2, 2)
    assert figures["benchmark"]["ours"]["fps"] > 0

    # The launch scripts import the package from the checkout when it is not installed.
    run([str(venv), "-m", "pip", "uninstall", "-q", "-y", "blip2-megatron"], 120)
    jobs = run([str(venv), str(REPO / "launch/train.py"), "--list-jobs"], 300, cwd=tmp_path, env=clean_env())
    assert "caption_coco_opt2.7b" in jobs.stdout.split()
