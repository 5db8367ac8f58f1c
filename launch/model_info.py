#!/usr/bin/env python
"""Parameter counts of the model flavours, per part and per TP/PP rank (no weights allocated).

    python launch/model_info.py                                  # every flavour, tp=pp=1
    python launch/model_info.py --flavour blip2_opt2.7b --tp 2 --pp 4
    python launch/model_info.py --flavour tiny --json
    python launch/model_info.py --config caption_coco_opt2.7b --pp 2   # a job's model (trained ViT, 364 px)
    python launch/model_info.py --flavour blip2_opt2.7b --pp 2 model.vision.freeze=false model.vision.image_size=364
    python launch/model_info.py --flavour blip2_vicuna7b --quantize none int8 nf4   # inference memory

Counts come from the model built on the meta device; per-rank figures follow the
tensor-parallel split of each parameter and the pipeline partition used in training (ViT
blocks, bridge, decoder layers and head per stage, with the costliest / cheapest ratio).
``--quantize`` adds the weight memory of the model loaded for inference on one device with
the LLM unquantized / int8 / nf4 (models/param_count.py ``inference_memory``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from _common import exit_with, importing_libraries, setup_logging


def main(argv: list[str] | None = None) -> int:
    from blip2_megatron.config import FLAVOURS

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--flavour", nargs="+", default=None, choices=list(FLAVOURS), metavar="NAME", help="default: all"
    )
    parser.add_argument("--config", default=None, help="a job (shipped name or YAML path): count its model")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the flavour's)")
    parser.add_argument(
        "--pp", type=int, default=None, help="pipeline-parallel size (default: the flavour's)"
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=["none", "int8", "nf4"],
        default=None,
        help="also print inference weight memory with the LLM in these modes",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per flavour instead of tables")
    parser.add_argument("overrides", nargs="*", help="model.a.b=value overrides (as for train.py)")
    args = parser.parse_args(argv)
    if args.config and args.flavour:
        parser.error("--config names a job whose model has its flavour: give one of --config and --flavour")
    setup_logging()
    logging.getLogger("blip2_megatron").setLevel(logging.WARNING)  # model-building chatter

    with importing_libraries():
        from blip2_megatron.config import ConfigError, build_model_config, load_job_config
        from blip2_megatron.config.base import parse_overrides
        from blip2_megatron.models.param_count import (
            count_parameters,
            format_report,
            human_bytes,
            inference_memory,
            report_dict,
        )
        from blip2_megatron.parallel import state

    state.initialize_model_parallel(1, 1)
    failed = 0
    try:
        for name in [args.config] if args.config else args.flavour or list(FLAVOURS):
            try:
                if args.config:
                    model = load_job_config(args.config, args.overrides).model
                else:
                    model = build_model_config(name, parse_overrides(args.overrides).get("model", {}))
                report = count_parameters(model, args.tp, args.pp, name=name)
                memory = [
                    inference_memory(model, mode) for mode in args.quantize or () if model.llm is not None
                ]
            except ConfigError as err:
                print(f"{name}: {err}", file=sys.stderr)
                failed += 1
                continue
            if args.json:
                print(json.dumps({**report_dict(report), "inference_memory": [vars(m) for m in memory]}))
                continue
            print(format_report(report))
            for m in memory:
                print(
                    f"  inference, LLM {m.quantize}: LLM weights {human_bytes(m.llm_bytes)}, other weights "
                    f"{human_bytes(m.other_bytes)}, peak while loading {human_bytes(m.peak_bytes)} (one device)"
                )
            print()
    finally:
        state.destroy()
    return 1 if failed else 0


if __name__ == "__main__":
    exit_with(main())
