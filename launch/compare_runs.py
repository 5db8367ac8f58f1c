#!/usr/bin/env python
"""Print the seed-style comparison table of several training runs.

    python launch/compare_runs.py runs/seed_gpu_full_8p runs/seed_npu_full_8p --labels "8 x GPU" "8 x 910B"

Reads each run directory's summary.json (or, failing that, the summary record at the end
of its log.jsonl) and prints one markdown row per run:

    | run | device | FPS | epochs | batch | BLEU@4 | CIDEr |

FPS is the run's mean images per second over all devices after warm-up; batch is per
device; BLEU@4 and CIDEr come from the caption evaluation at the end of training. A figure
a run does not have is shown as "n/a".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = ("run", "device", "FPS", "epochs", "batch", "BLEU@4", "CIDEr")


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """summary.json, else the last summary record of log.jsonl, else None."""
    path = run_dir / "summary.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            print(f"warning: {path} is not valid JSON ({err}); trying log.jsonl", file=sys.stderr)
    log = run_dir / "log.jsonl"
    if log.is_file():
        summary = None
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("event") == "summary":
                summary = record
        return summary
    return None


def _number(value: Any, digits: int) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "n/a"
    return f"{value:.{digits}f}"


def _device(summary: dict[str, Any]) -> str:
    device, world = summary.get("device"), summary.get("world_size")
    if device is None:
        return "n/a"
    return f"{world} x {device}" if world else str(device)


def table_row(label: str, summary: dict[str, Any] | None) -> list[str]:
    if summary is None:
        return [label, *["n/a"] * (len(COLUMNS) - 1)]
    epochs = summary.get("epochs")
    batch = summary.get("per_device_batch")
    return [
        label,
        _device(summary),
        _number(summary.get("fps_mean"), 2),
        str(epochs) if epochs is not None else "n/a",
        str(batch) if batch is not None else "n/a",
        _number(summary.get("Bleu_4"), 3),
        _number(summary.get("CIDEr"), 3),
    ]


def markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (train.output_dir)")
    parser.add_argument(
        "--labels", nargs="+", default=None, help="one label per run (default: directory names)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)

    labels = args.labels or [run.name for run in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"{len(labels)} label(s) for {len(args.runs)} run(s): give one label per run")
    rows = []
    for label, run in zip(labels, args.runs):
        summary = read_summary(run)
        if summary is None:
            print(f"warning: {run} has no summary.json or summary record in log.jsonl", file=sys.stderr)
        rows.append(table_row(label, summary))
    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
