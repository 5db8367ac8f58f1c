#!/usr/bin/env python
"""Measure training throughput: FPS, FPS/device, step-time breakdown, TFLOP/s, MFU, memory.

    python launch/benchmark.py --config tiny_stage2 --steps 20 --warmup 5 --baseline hf
    deepspeed launch/benchmark.py --ds_config ds_configs/zero2.json --config stage2_opt2.7b --steps 100

Warm-up steps are excluded. Data is synthetic and in memory unless --real-data is given.
`--baseline hf` also runs the same model size, batch, frozen/trained split and dtype
through transformers' Blip2ForConditionalGeneration (single process) and prints the
speed and memory ratios; `--baseline replicated` (TP > 1) runs the same layout with every
TP rank encoding all images first. `--rounds N` alternates the two sides N times and
reports each ratio's median and range over the rounds (the figures to quote: a shared
machine's speed varies from minute to minute). A JSON file with every figure is written (--out);
`--profile` adds where each side's step goes (torch.profiler, a few steps after the measured ones).

    deepspeed --num_gpus 2 launch/benchmark.py --config bench_vision_tp model.llm.tp=2 --baseline replicated

`--generate` times generation instead: ours against transformers' Blip2 `generate` on the
same weights (our model exported), images, prompt, beams (`--beams`, default greedy and 5),
`--new-tokens` and precision, alternating for `--rounds` rounds; prints tokens/s, images/s
and peak memory of both and whether the tokens are identical (training.generation_benchmark).

    python launch/benchmark.py --generate --config bench_midsize --rounds 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import exit_with, importing_libraries, setup_logging

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ds_config", "--ds-config", default=str(REPO / "ds_configs" / "zero1.json"))
    parser.add_argument("--config", default=None, help="job YAML or shipped job (default: tiny_stage2)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="steps run before measuring (default 5); with --generate, untimed calls per side and mode (1)",
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="time generation against transformers' generate (same weights, inputs and settings)",
    )
    parser.add_argument("--beams", type=int, nargs="+", default=[1, 5], help="with --generate: beam counts")
    parser.add_argument(
        "--new-tokens", type=int, default=20, help="with --generate: tokens each side generates per image"
    )
    parser.add_argument(
        "--real-data", action="store_true", help="read the job's data instead of a synthetic batch"
    )
    parser.add_argument(
        "--baseline",
        choices=["hf", "replicated"],
        default=None,
        help="also run transformers' Blip2 model (hf), or this layout with every TP rank encoding "
        "all images (replicated, TP > 1), and print the ratios",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --baseline: alternate baseline and ours this many times and report the median and "
        "range of the ratios by round",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the measured steps, profile a few more of each side: op time, the share in "
        "matmul / attention / convolution kernels, the costliest ops (op tables in <out stem>_profile.txt)",
    )
    parser.add_argument("--out", default=None, help="JSON output (default: <output_dir>/benchmark.json)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = parser.parse_args(argv)
    setup_logging()

    with importing_libraries():
        from blip2_megatron.config import ConfigError, load_job_config
        from blip2_megatron.parallel import state
        from blip2_megatron.training.benchmark import run_benchmark
        from blip2_megatron.training.generation_benchmark import run_generation_benchmark

    try:
        job = load_job_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.generate:
        out = Path(args.out) if args.out else Path(job.train.output_dir) / "generation_benchmark.json"
        run_generation_benchmark(
            job,
            out,
            rounds=args.rounds,
            beams=tuple(args.beams),
            new_tokens=args.new_tokens,
            warmup=1 if args.warmup is None else args.warmup,
            profile=args.profile,
        )
        print(f"figures written to {out}")
        return 0
    out = Path(args.out) if args.out else Path(job.train.output_dir) / "benchmark.json"
    try:
        run_benchmark(
            job,
            args.ds_config,
            args.steps,
            5 if args.warmup is None else args.warmup,
            args.real_data,
            args.baseline,
            out,
            args.rounds,
            args.profile,
        )
    finally:
        state.destroy()
    if state.launch_env().rank == 0:  # rank 0 writes them (and one line, not one per rank)
        print(f"figures written to {out}")
    return 0


if __name__ == "__main__":
    exit_with(main())
