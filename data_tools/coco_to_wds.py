"""Convert caption annotations (COCO Karpathy json, or cc_sbu_align) + images into webdataset shards.

Writes img2dataset-style shards (``{key}.jpg`` / ``.txt`` / ``.json``) with a
``NNNNN_stats.json`` per shard; missing images count as failed_to_download, unreadable
ones as failed_to_resize.

    python data_tools/coco_to_wds.py --annotation coco_karpathy_train.json \\
        --image-root /data/coco/images --output /data/coco_wds
"""

from __future__ import annotations

import argparse
import sys

from blip2_megatron.data.annotations import ImagePathResolver, annotations_to_shards, load_caption_records
from blip2_megatron.data.wds import describe_stats, read_stats_files


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--annotation", required=True, help="annotation json")
    parser.add_argument(
        "--image-root", required=True, help="folder the annotation image paths are relative to"
    )
    parser.add_argument("--output", required=True, help="output folder for the shards")
    parser.add_argument(
        "--format", default="coco", choices=["coco", "cc_sbu_align"], help="annotation layout (default: coco)"
    )
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = load_caption_records(args.annotation, args.format)
    shards = annotations_to_shards(
        records, ImagePathResolver(args.image_root), args.output, args.samples_per_shard
    )
    print(f"wrote {len(shards)} shard(s) to {args.output}")
    print(describe_stats(read_stats_files(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
