#!/usr/bin/env python
"""Caption images or answer a question about them, one line per image.

    python launch/predict.py --model runs/tiny_stage2 --image a.jpg b.jpg
    python launch/predict.py --model /models/blip2-opt-2.7b --image a.jpg --question "what is on the table?"

``--model`` is a local Hugging Face Blip2 directory, a training run / checkpoint
directory, or a flavour name (``--model tiny``, random weights unless the job config names
weights). An image that is missing or unreadable is reported by path; the others still run.
"""

from __future__ import annotations

import argparse
import sys

from _common import exit_with, importing_libraries, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="HF Blip2 directory, run/checkpoint directory, or flavour"
    )
    parser.add_argument("--image", nargs="+", required=True, help="image files")
    parser.add_argument(
        "--prompt", default=None, help="caption prompt (default: the model's, e.g. 'a photo of')"
    )
    parser.add_argument("--question", default=None, help="answer this question instead of captioning")
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument(
        "--max-new-tokens", type=int, default=None, help="default 30 for captions, 10 for answers"
    )
    parser.add_argument("--min-new-tokens", type=int, default=1)
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default=None,
        help="compute dtype of generation (default: the run's eval.precision; auto = training's off CPU)",
    )
    parser.add_argument(
        "--quantize",
        choices=["none", "int8", "nf4"],
        default=None,
        help="frozen LLM's linear layers in int8 (LLM.int8) or 4-bit NF4 through bitsandbytes "
        "(default: the model's, none unless a directory was saved quantized)",
    )
    args = parser.parse_args(argv)
    setup_logging()

    with importing_libraries():
        import torch

        from blip2_megatron.api import load_model_and_preprocess
        from blip2_megatron.data.processors import ImageDecodeError, load_rgb

    model, image_processors, _ = load_model_and_preprocess(
        args.model, precision=args.precision, quantize=args.quantize
    )
    processor = image_processors["eval"]
    failed = 0
    for path in args.image:
        try:
            image = processor(load_rgb(path)).unsqueeze(0)
        except (FileNotFoundError, IsADirectoryError, ImageDecodeError, OSError) as err:
            print(f"{path}\tERROR: {err}")
            failed += 1
            continue
        image = image.to(next(model.parameters()).device)
        with torch.no_grad():
            if args.question:
                text = model.predict_answers(
                    {"image": image, "text_input": [args.question]},
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens or 10,
                    min_new_tokens=args.min_new_tokens,
                )[0]
            else:
                kwargs = {} if args.prompt is None else {"prompt": args.prompt}
                text = model.generate(
                    {"image": image},
                    num_beams=args.num_beams,
                    max_new_tokens=args.max_new_tokens or 30,
                    min_new_tokens=args.min_new_tokens,
                    **kwargs,
                )[0]
        print(f"{path}\t{text}")
    speed = model.tokens_per_second()
    if speed:
        dtype = str(model.compute_dtype or torch.float32).removeprefix("torch.")
        print(
            f"generated {model.generated_tokens} tokens in {model.generation_seconds:.2f} s: "
            f"{speed:.1f} tokens/s ({dtype})",
            file=sys.stderr,
        )
    return 1 if failed == len(args.image) else 0


if __name__ == "__main__":
    exit_with(main())
