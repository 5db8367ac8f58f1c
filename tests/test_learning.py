"""The learning proof: the default job learns to caption the built-in data.

Runs the README's default job (tiny_stage2: about 1000 steps on CPU plus a val caption
evaluation), evaluates the same model untrained with launch/evaluate.py, and compares
CIDEr on the held-out val split. Then captions images with launch/predict.py from the
trained run. Slow (a few minutes), run in CI all the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from dist_utils import launcher_free_env

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args],
        env=launcher_free_env(PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_default_job_learns_to_caption_held_out_images(tmp_path):
    sample_root = tmp_path / "sample"
    trained = tmp_path / "trained"
    common = [f"data.sample_root={sample_root}"]
    _run(["launch/train.py", f"train.output_dir={trained}", *common])
    summary = json.loads((trained / "summary.json").read_text())

    untrained = tmp_path / "untrained"
    _run(["launch/evaluate.py", "--config", "tiny_stage2", "--output", str(untrained), *common])
    before = json.loads((untrained / "eval" / "metrics_caption_val.json").read_text())

    print(
        f"val CIDEr untrained {before['CIDEr']:.3f} -> trained {summary['CIDEr']:.3f}; "
        f"BLEU-4 {before['Bleu_4']:.3f} -> {summary['Bleu_4']:.3f}"
    )
    assert before["CIDEr"] < 0.3
    assert summary["CIDEr"] > 1.5 and summary["CIDEr"] > 5 * before["CIDEr"]
    assert summary["Bleu_4"] > 0.3
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "event" not in r]
    assert losses[-1] < 0.5 * losses[0]

    # The trained run captions images from the command line; a missing file is reported, not fatal.
    val = json.loads((sample_root / "val.json").read_text())
    images = [str(sample_root / "images" / item["image"]) for item in val[:2]]
    proc = _run(
        ["launch/predict.py", "--model", str(trained), "--image", *images, "missing.jpg", "--num-beams", "3"]
    )
    lines = [line for line in proc.stdout.splitlines() if "\t" in line]
    assert len(lines) == 3
    assert lines[2].startswith("missing.jpg\tERROR")
    for line in lines[:2]:
        caption = line.split("\t", 1)[1]
        assert caption and not caption.startswith("ERROR")
