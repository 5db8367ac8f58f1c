#!/usr/bin/env python
"""Train a BLIP-2 job.

    deepspeed launch/train.py --ds_config ds_configs/zero2.json [--config JOB] [key=value ...]
    torchrun --nproc-per-node 2 launch/train.py --ds_config ds_configs/zero2.json ...
    python launch/train.py            # the embedded default: tiny_stage2 on the built-in data, CPU

JOB is a YAML file or the name of a shipped job (`--list-jobs`). Overrides use dotted
keys: `train.max_steps=50 model.llm.tp=2 data.batch_size=8`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import exit_with, importing_libraries, setup_logging

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ds_config",
        "--ds-config",
        default=str(REPO / "ds_configs" / "zero2.json"),
        help="DeepSpeed JSON config (default: ds_configs/zero2.json)",
    )
    parser.add_argument("--config", default=None, help="job YAML or shipped job name (default: tiny_stage2)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--list-jobs", action="store_true", help="print the shipped job names and exit")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    with importing_libraries():
        from blip2_megatron.config import ConfigError, load_job_config, shipped_job_names
        from blip2_megatron.training.ds_config import read_ds_config

    if args.list_jobs:
        print("\n".join(shipped_job_names()))
        return 0
    try:
        job = load_job_config(args.config, args.overrides)
        read_ds_config(args.ds_config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    with importing_libraries():
        from blip2_megatron.io import CheckpointMismatchError
        from blip2_megatron.training.faults import TrainingStopped
        from blip2_megatron.training.trainer import run_training

    try:
        run_training(job, args.ds_config)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except CheckpointMismatchError as err:
        print(f"checkpoint error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        from blip2_megatron.parallel import state

        state.destroy()
    return 0


if __name__ == "__main__":
    exit_with(main())
