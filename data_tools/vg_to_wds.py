"""Convert Visual Genome caption annotations + images into webdataset shards.

The annotation's image paths (``VG_100K/1.jpg``) often do not match where the files
are (half of VG sits in ``VG_100K_2/``): a path that does not exist is looked up by file
name in each ``--image-subdirs`` folder. Images found nowhere are counted as
failed_to_download in the shards' ``_stats.json``.

    python data_tools/vg_to_wds.py --annotation vg_caption.json --image-root /data/vg --output /data/vg_wds
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
    parser.add_argument(
        "--annotation", required=True, help="VG caption json (LAVIS layout: [{image, caption}])"
    )
    parser.add_argument("--image-root", required=True, help="folder holding VG_100K/ and VG_100K_2/")
    parser.add_argument("--output", required=True, help="output folder for the shards")
    parser.add_argument(
        "--image-subdirs",
        nargs="*",
        default=["VG_100K", "VG_100K_2"],
        help="sub-folders searched by file name when a path is missing (default: VG_100K VG_100K_2)",
    )
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = load_caption_records(args.annotation, "vg")
    resolver = ImagePathResolver(args.image_root, args.image_subdirs)
    shards = annotations_to_shards(records, resolver, args.output, args.samples_per_shard)
    print(f"wrote {len(shards)} shard(s) to {args.output}")
    print(describe_stats(read_stats_files(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
