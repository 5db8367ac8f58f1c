#!/usr/bin/env python
"""Soak run: the default job for many steps with periodic saves and validation, RSS sampled.

    python tests/scripts/soak_rss.py --steps 5000 --nproc 2 --out /tmp/soak

Runs ``deepspeed launch/train.py --ds_config ds_configs/zero2.json`` (the README's main
command) with ``train.save_interval`` and ``eval.interval`` set, samples the resident
memory (RSS, and the anonymous part of it) of every training process every few seconds
together with the step it had logged, and prints the peak after warm-up against the peak
over the last stretch of the run: the growth a week-long job would show as a leak. Too
long for CI (about 15 minutes at 5000 steps on 2 cores); its figures go in notes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]


def _last_step(log: Path) -> int:
    step = 0
    if log.is_file():
        for line in log.read_text().splitlines():
            record = json.loads(line)
            if "event" not in record:
                step = max(step, record.get("step", 0))
    return step


def _rank_processes(launcher: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in launcher.children(recursive=True) if "--local_rank=" in " ".join(p.cmdline())]
    except psutil.NoSuchProcess:
        return []


def _rss_anon(process: psutil.Process) -> int:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--save-interval", type=int, default=500)
    parser.add_argument("--eval-interval", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=500, help="steps before the baseline peak is taken")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    run = args.out / "run"
    command = [
        "deepspeed", "--num_gpus", str(args.nproc), "launch/train.py",
        "--ds_config", "ds_configs/zero2.json",
        f"train.output_dir={run}", f"train.max_steps={args.steps}", "train.log_interval=50",
        f"train.save_interval={args.save_interval}", f"eval.interval={args.eval_interval}",
        "eval.max_samples=32", "eval.num_beams=2", "eval.enabled=false",
    ]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    parent = psutil.Process(launcher.pid)
    samples: list[tuple[int, int, int]] = []  # (logged step, max RSS over ranks, max RssAnon over ranks)
    start = time.monotonic()
    while launcher.poll() is None:
        ranks = _rank_processes(parent)
        try:
            rss = max((p.memory_info().rss for p in ranks), default=0)
            anon = max((_rss_anon(p) for p in ranks), default=0)
        except (psutil.NoSuchProcess, FileNotFoundError):
            rss = anon = 0
        if rss:
            samples.append((_last_step(run / "log.jsonl"), rss, anon))
        time.sleep(args.every)
    took = time.monotonic() - start
    if launcher.returncode != 0:
        print(f"training exited with code {launcher.returncode}", file=sys.stderr)
        return 1
    after_warmup = [s for s in samples if s[0] >= args.warmup]
    last_stretch = [s for s in after_warmup if s[0] >= args.steps - args.steps // 5]
    early = [s for s in after_warmup if s[0] < args.warmup + args.steps // 5]
    if not early or not last_stretch:
        print("too few samples after warm-up", file=sys.stderr)
        return 1
    gib = 2**30
    for label, index in (("RSS", 1), ("RssAnon", 2)):
        base = max(s[index] for s in early)
        end = max(s[index] for s in last_stretch)
        print(
            f"{label}: peak {base / gib:.3f} GiB in steps {args.warmup}-{args.warmup + args.steps // 5}, "
            f"{end / gib:.3f} GiB in the last fifth: growth {100 * (end - base) / base:+.2f}%"
        )
    print(f"{args.steps} steps, {args.nproc} ranks, saves every {args.save_interval}, validation every "
          f"{args.eval_interval}: {took / 60:.1f} min, {len(samples)} samples")  # fmt: skip
    (args.out / "rss_samples.json").write_text(json.dumps(samples))
    return 0


if __name__ == "__main__":
    sys.exit(main())
