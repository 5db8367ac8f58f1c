"""Generate the built-in synthetic shapes dataset used by the embedded default job.

Idempotent: an existing dataset with the same parameters is reused, and a crash never
leaves a half-written one. The train shards, val/test annotations and COCO ground-truth
files it prints are what ``data.kind: sample`` reads; the VQA training shards and the
cc_sbu_align shards (``vqa_train_shards``, ``conversation_shards``) are the built-in
sources of ``data.source_tasks: [caption, vqa, conversation]`` (instruction tuning).

    python data_tools/make_sample_dataset.py --root data/sample_dataset
"""

from __future__ import annotations

import argparse
import sys
import time

from blip2_megatron.data.sample_dataset import ensure_sample_dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", default="data/sample_dataset", help="output folder (default: data/sample_dataset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--num-train", type=int, default=4000, help="training images")
    parser.add_argument("--num-val", type=int, default=150, help="validation images")
    parser.add_argument("--num-test", type=int, default=150, help="test images")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--num-shards", type=int, default=8, help="training shards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    paths = ensure_sample_dataset(
        args.root,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        num_shards=args.num_shards,
        progress=True,
    )
    print(f"sample dataset ready in {time.perf_counter() - started:.1f} s")
    for name, value in vars(paths).items():
        print(f"  {name:16s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
