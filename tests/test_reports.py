"""launch/plot_run.py and launch/compare_runs.py on run directories written by the test."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLOT = REPO / "launch" / "plot_run.py"
COMPARE = REPO / "launch" / "compare_runs.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _run(script: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)


def make_run(
    root: Path, name: str, *, stage1: bool = False, summary: dict | None = None, steps: int = 40
) -> Path:
    """A run directory as the trainer leaves it: config.yaml, log.jsonl, summary.json."""
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: {name}\nmodel:\n  flavour: tiny\ntrain:\n  max_steps: {steps}\n")
    lines = []
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step // 20, "loss": 4.0 * math.exp(-step / 15) + 0.5}
        if stage1:  # stage 1 logs its three losses; lr and timings left out on purpose
            record.update(loss_itc=1.5 / step, loss_itm=0.7, loss_lm=2.0 / math.sqrt(step))
        else:
            record.update(
                lr=1e-4 * min(1.0, step / 10),
                fps=100.0 + step % 7,
                fps_per_device=12.5,
                step_time=0.16,
                data_time=0.01,
            )
        lines.append(json.dumps(record))
    if summary is not None:
        lines.append(json.dumps({"event": "summary", **summary}))
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "log.jsonl").write_text("\n".join(lines) + "\n")
    return run


GPU_SUMMARY = {
    "fps_mean": 102.28,
    "epochs": 5,
    "per_device_batch": 16,
    "world_size": 8,
    "device": "NVIDIA A100",
    "Bleu_4": 0.4231,
    "CIDEr": 1.4387,
    "steps": 2000,
}
NPU_SUMMARY = {
    "fps_mean": 61.95,
    "epochs": 5,
    "per_device_batch": 16,
    "world_size": 8,
    "device": "Ascend910B",
    "Bleu_4": 0.421,
    "CIDEr": 1.432,
}


def test_plot_run_writes_png(tmp_path):
    run = make_run(tmp_path, "gpu_full", summary=GPU_SUMMARY)
    res = _run(PLOT, str(run))
    assert res.returncode == 0, res.stderr
    png = run / "curves.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000, len(data)  # four panels of curves, not an empty canvas


def test_plot_run_handles_missing_optional_keys(tmp_path):
    # Stage-1 style: several losses, no lr / fps / timings; a resumed run repeats steps and
    # a killed run may leave half a line.
    run = make_run(tmp_path, "stage1", stage1=True)
    with (run / "log.jsonl").open("a") as fh:
        fh.write(json.dumps({"step": 40, "epoch": 2, "loss": 0.6}) + "\n")
        fh.write('{"step": 41, "loss"')
    out = tmp_path / "plots" / "stage1.png"
    res = _run(PLOT, str(run), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert out.stat().st_size > 10_000
    assert "skipped 1 unreadable line" in res.stderr


@pytest.mark.parametrize("content", [None, "", '{"event": "summary", "fps_mean": 1.0}\n'])
def test_plot_run_clear_error_without_steps(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "log.jsonl").write_text(content)
    res = _run(PLOT, str(run))
    assert res.returncode == 2
    expected = "not found" if content is None else "no step records"
    assert expected in res.stderr and "log.jsonl" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_compare_runs_table(tmp_path):
    gpu = make_run(tmp_path, "gpu_full", summary=GPU_SUMMARY)
    npu = make_run(tmp_path, "npu_full", summary=NPU_SUMMARY)
    # A performance run: no caption metrics; its summary only in log.jsonl.
    perf = make_run(
        tmp_path,
        "cpu_perf",
        summary={"fps_mean": 3.5, "epochs": 1, "per_device_batch": 4, "world_size": 2, "device": "cpu"},
    )
    (perf / "summary.json").unlink()
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    out = tmp_path / "table.md"
    res = _run(
        COMPARE,
        str(gpu),
        str(npu),
        str(perf),
        str(empty),
        "--labels",
        "8 x GPU",
        "8 x 910B",
        "cpu perf",
        "missing",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "| run | device | FPS | epochs | batch | BLEU@4 | CIDEr |"
    assert lines[2] == "| 8 x GPU | 8 x NVIDIA A100 | 102.28 | 5 | 16 | 0.423 | 1.439 |"
    assert lines[3] == "| 8 x 910B | 8 x Ascend910B | 61.95 | 5 | 16 | 0.421 | 1.432 |"
    assert lines[4] == "| cpu perf | 2 x cpu | 3.50 | 1 | 4 | n/a | n/a |"
    assert lines[5] == "| missing | n/a | n/a | n/a | n/a | n/a | n/a |"
    assert "not_a_run has no summary.json" in res.stderr
    assert out.read_text().strip() == res.stdout.strip()


def test_compare_runs_default_labels_and_label_count(tmp_path):
    run = make_run(tmp_path, "seed_gpu_full_8p", summary=GPU_SUMMARY)
    res = _run(COMPARE, str(run))
    assert res.returncode == 0, res.stderr
    assert "| seed_gpu_full_8p | 8 x NVIDIA A100 | 102.28 |" in res.stdout
    res = _run(COMPARE, str(run), "--labels", "a", "b")
    assert res.returncode != 0 and "one label per run" in res.stderr
