#!/usr/bin/env python
"""Evaluate a model: COCO captions (pycocoevalcap), zero-shot VQAv2, or stage-1 retrieval.

    deepspeed launch/evaluate.py --config caption_coco_opt2.7b --checkpoint runs/caption_coco_opt2.7b
    python launch/evaluate.py --checkpoint runs/tiny_stage2 eval.split=test

``--checkpoint`` is a run directory (its ``checkpoints/latest``) or one checkpoint
directory, saved in any TP x PP layout (it is read in the layout this launch gives:
``model.llm.tp=N`` to choose); without it the job's initial weights are evaluated. Results
and metrics are written under ``<output>/eval/`` and printed as a table. Missing or
unreadable images are skipped and counted; an evaluation with nothing to score exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import exit_with, importing_libraries, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="job YAML or shipped job (default: the checkpoint's config)"
    )
    parser.add_argument("--checkpoint", default=None, help="run directory or checkpoint directory")
    parser.add_argument("--output", default=None, help="where eval/ goes (default: the run directory)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--quantize",
        choices=["none", "int8", "nf4"],
        default=None,
        help="frozen LLM's linear layers in int8 (LLM.int8) or 4-bit NF4 through bitsandbytes "
        "(default: the job's model.llm.quantize)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides (eval.task=vqa ...)")
    args = parser.parse_args(argv)
    setup_logging()

    with importing_libraries():
        from blip2_megatron.api import load_trained_model
        from blip2_megatron.config import ConfigError
        from blip2_megatron.eval.runner import EvaluationError, run_evaluation
        from blip2_megatron.io import CheckpointMismatchError
        from blip2_megatron.parallel import state

    try:
        quantize = [f"model.llm.quantize={args.quantize}"] if args.quantize else []
        model, job, run_dir = load_trained_model(
            args.checkpoint, args.config, ["eval.enabled=true", *quantize, *args.overrides]
        )
        output = Path(args.output or run_dir or job.train.output_dir)
        metrics = run_evaluation(model, job, output)
    except (ConfigError, FileNotFoundError, CheckpointMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except EvaluationError as err:
        print(f"evaluation failed: {err}", file=sys.stderr)
        return 1
    finally:
        state.destroy()
    if metrics:
        print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    exit_with(main())
