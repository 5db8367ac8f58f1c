#!/usr/bin/env python
"""Convert weights between transformers' Blip2 and ours, and reshard runs between layouts.

    python launch/convert.py hf-to-ours --hf /models/blip2-opt-2.7b --out weights/blip2_opt_qformer.safetensors \
        [--llm-out weights/opt-2.7b]
    python launch/convert.py ours-to-hf --checkpoint runs/stage2_opt2.7b --out exports/blip2-opt-2.7b \
        [--set model.llm.tp=1 ...]
    python launch/convert.py reshard --checkpoint runs/stage2_vicuna7b --tp 1 --pp 1 --out runs/stage2_vicuna7b-tp1

``hf-to-ours`` writes our names for the ViT, Q-Former, queries and projection (use it as
``model.init_checkpoint``) and, with ``--llm-out``, the LLM as a transformers directory
(``model.llm.weights``). ``ours-to-hf`` exports a run or checkpoint directory of any TP x PP
layout (or, with ``--config`` only, a job's initial weights) as a directory that
``Blip2ForConditionalGeneration.from_pretrained`` loads; more processes
(``torchrun --nproc_per_node 2 launch/convert.py ours-to-hf ...``) split the model over TP.
``reshard`` rewrites a run's saved weights for another TP x PP (no model is built): the new
run directory can be resumed (``train.resume=<dir>``; the optimizer's moments restart),
evaluated or exported. Base weights stay where the job names them.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from _common import exit_with, importing_libraries, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    to_ours = commands.add_parser("hf-to-ours", help="transformers Blip2 directory -> our weight files")
    to_ours.add_argument("--hf", required=True, help="local transformers Blip2 directory")
    to_ours.add_argument("--out", required=True, help="output .safetensors (query encoder + projection)")
    to_ours.add_argument(
        "--llm-out", default=None, help="also write the LLM as a transformers directory here"
    )
    to_ours.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    to_hf = commands.add_parser("ours-to-hf", help="run / checkpoint -> transformers Blip2 directory")
    to_hf.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory")
    to_hf.add_argument("--config", default=None, help="job config (default: the checkpoint's config.yaml)")
    to_hf.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="job overrides (a.b=c)")
    to_hf.add_argument("--out", required=True, help="output directory")
    to_hf.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    reshard = commands.add_parser("reshard", help="run / checkpoint -> run for another TP x PP")
    reshard.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    reshard.add_argument("--tp", type=int, required=True, help="target tensor-parallel size")
    reshard.add_argument("--pp", type=int, required=True, help="target pipeline-parallel size")
    reshard.add_argument("--out", required=True, help="output run directory")
    reshard.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "ours-to-hf" and not (args.checkpoint or args.config):
        parser.error("ours-to-hf needs --checkpoint or --config")
    setup_logging()

    with importing_libraries():
        from blip2_megatron.config import ConfigError
        from blip2_megatron.convert import cli
        from blip2_megatron.io import CheckpointMismatchError

    try:
        return _run(cli, args)
    except (ConfigError, FileExistsError, FileNotFoundError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(cli: ModuleType, args: argparse.Namespace) -> int:
    if args.command == "hf-to-ours":
        counts = cli.hf_to_ours(args.hf, args.out, args.llm_out, overwrite=args.overwrite)
        print(
            f"wrote {counts['ours']} tensors to {args.out}"
            + (f", {counts['llm']} to {args.llm_out}" if "llm" in counts else "")
        )
    elif args.command == "reshard":
        out = cli.reshard_run(args.checkpoint, args.out, args.tp, args.pp, overwrite=args.overwrite)
        print(f"wrote {out}")
    else:
        from blip2_megatron.api import export_to_hf
        from blip2_megatron.parallel import state

        try:
            out = export_to_hf(args.out, args.checkpoint, args.config, args.set, overwrite=args.overwrite)
        finally:
            state.destroy()
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    exit_with(main())
