#!/usr/bin/env python
"""Draw a training run's curves into a PNG: loss(es), learning rate and FPS over steps.

    python launch/plot_run.py runs/tiny_stage2                 # writes runs/tiny_stage2/curves.png
    python launch/plot_run.py runs/tiny_stage2 --out curves.png

Reads <run dir>/log.jsonl (one record per log step, as the trainer writes it) and, for the
title, <run dir>/config.yaml. Optional figures (stage-1 losses, per-device FPS, step and
data time) are drawn when the log has them. When a run was resumed from an earlier
checkpoint, the later record of a repeated step wins. It prints the PNG's path, the steps
it drew and each curve's points.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class RunLogError(Exception):
    """The run directory has no usable log (the message says what is wrong)."""


def read_step_records(run_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Step records sorted by step (last one wins per step) and the summary record, if any."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        raise RunLogError(f"{path} not found: is {run_dir} a run directory (train.output_dir)?")
    by_step: dict[int, dict[str, Any]] = {}
    summary = None
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1  # e.g. the last line of a run killed mid-write
            continue
        if not isinstance(record, dict):
            bad += 1
        elif record.get("event") == "summary":
            summary = record
        elif "event" in record:
            continue  # validation results and other events: not a training step
        elif isinstance(record.get("step"), int):
            by_step[record["step"]] = record
    if bad:
        print(f"warning: skipped {bad} unreadable line(s) in {path}", file=sys.stderr)
    if not by_step:
        raise RunLogError(f"{path} has no step records (the run logged nothing yet?)")
    return [by_step[step] for step in sorted(by_step)], summary


def run_title(run_dir: Path, summary: dict[str, Any] | None) -> str:
    """'<job name> (<flavour>)' from config.yaml, plus mean FPS and world size when known."""
    title = run_dir.resolve().name
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            import yaml

            config = yaml.safe_load(config_path.read_text()) or {}
            name = config.get("name") or title
            flavour = (config.get("model") or {}).get("flavour")
            title = f"{name} ({flavour})" if flavour else str(name)
        except Exception as err:  # noqa: BLE001 - a title is not worth failing for
            print(f"warning: could not read {config_path}: {err}", file=sys.stderr)
    if summary and isinstance(summary.get("fps_mean"), int | float):
        title += f" | mean {summary['fps_mean']:.1f} img/s"
        if summary.get("world_size"):
            title += f" on {summary['world_size']} x {summary.get('device', 'device')}"
    return title


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a numeric ``key``."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [p[0] for p in points], [p[1] for p in points]


@dataclass
class DrawnPlot:
    """What :func:`plot_run` wrote: the PNG, and the steps each drawn curve has (what the CLI reports)."""

    path: Path
    steps: list[int]
    """Every logged step, in order (after the last record of a repeated step won)."""
    series: dict[str, list[int]] = field(default_factory=dict)
    """Curve name (log key) -> the steps it has a point at."""

    def describe(self) -> str:
        """'wrote <path>: N logged steps (first..last)' and one line per curve."""
        lines = [f"wrote {self.path}: {len(self.steps)} logged steps ({self.steps[0]}..{self.steps[-1]})"]
        for key, steps in self.series.items():
            lines.append(f"  {key}: {len(steps)} points, steps {steps[0]}..{steps[-1]}")
        return "\n".join(lines)


def plot_run(run_dir: Path, out: Path) -> DrawnPlot:
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    records, summary = read_step_records(run_dir)
    loss_keys = sorted(
        {k for r in records for k in r if k.startswith("loss")}, key=lambda k: (k != "loss", k)
    )
    panels = [("loss", loss_keys), ("learning rate", ["lr"]), ("images / s", ["fps", "fps_per_device"])]
    if any("step_time" in r or "data_time" in r for r in records):
        panels.append(("seconds", ["step_time", "data_time"]))

    drawn_plot = DrawnPlot(out, [r["step"] for r in records])
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (ylabel, keys) in zip(axes[:, 0], panels):
        drawn = 0
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=key)
                drawn_plot.series[key] = steps
                drawn += 1
        if drawn:
            ax.legend(loc="best", fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {'/'.join(keys)} in log", ha="center", va="center", transform=ax.transAxes)
        if ylabel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(run_title(run_dir, summary))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn_plot


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="run directory (train.output_dir) holding log.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: <run dir>/curves.png)")
    args = parser.parse_args(argv)
    try:
        drawn = plot_run(args.run_dir, args.out or args.run_dir / "curves.png")
    except RunLogError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(drawn.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
