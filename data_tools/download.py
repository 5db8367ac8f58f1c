"""Download an image-text URL list into webdataset shards with img2dataset.

Accepts tsv / csv / parquet / txt url lists as img2dataset does, and JSON lists of
``{"url": ..., "caption": ...}`` such as MiniGPT-4's ``ccs_synthetic_filtered_large.json``
and ``laion_synthetic_filtered_large.json``, which are converted to parquet first (the
columns are checked up front, with a clear error, instead of deep inside img2dataset's
worker processes). Prints the success / failure counts summed from img2dataset's
``*_stats.json`` files at the end.

    python data_tools/download.py --url-list laion_synthetic_filtered_large.json --output /data/laion
    python data_tools/download.py --url-list cc3m.tsv --image-size 364 --processes 16 --threads 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from blip2_megatron.data.wds import describe_stats, read_stats_files

INPUT_FORMATS = {".tsv": "tsv", ".csv": "csv", ".parquet": "parquet", ".txt": "txt", ".json": "json"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url-list", required=True, help="tsv / csv / parquet / txt / json url list")
    parser.add_argument("--output", required=True, help="output folder for NNNNN.tar shards")
    parser.add_argument("--url-col", default="url", help="column holding the image url")
    parser.add_argument("--caption-col", default="caption", help="column holding the caption ('' for none)")
    parser.add_argument(
        "--image-size", type=int, default=224, help="output side in pixels (BLIP-2: 224 or 364)"
    )
    parser.add_argument(
        "--resize-mode",
        default="border",
        choices=["border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"],
        help="img2dataset resize mode (border pads to a square, keep_ratio keeps the shorter side)",
    )
    parser.add_argument("--encode-quality", type=int, default=95, help="JPEG quality of the stored images")
    parser.add_argument("--processes", type=int, default=4, help="download processes")
    parser.add_argument("--threads", type=int, default=32, help="download threads per process")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard")
    parser.add_argument("--retries", type=int, default=2, help="retries per url")
    parser.add_argument("--timeout", type=int, default=10, help="seconds per request")
    return parser.parse_args(argv)


def json_to_parquet(json_path: Path, parquet_path: Path, url_col: str, caption_col: str) -> Path:
    """Convert a JSON list of records to parquet, checking that the needed columns exist."""
    with open(json_path) as handle:
        records = json.load(handle)
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        raise SystemExit(f"{json_path}: expected a non-empty JSON list of objects")
    frame = pd.DataFrame.from_records(records)
    for column in filter(None, (url_col, caption_col)):
        if column not in frame.columns:
            raise SystemExit(f"{json_path}: no {column!r} field (fields: {list(frame.columns)})")
    frame.to_parquet(parquet_path, index=False)
    print(f"converted {len(frame)} records: {json_path} -> {parquet_path}")
    return parquet_path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url_list = Path(args.url_list)
    if not url_list.exists():
        raise SystemExit(f"url list not found: {url_list}")
    input_format = INPUT_FORMATS.get(url_list.suffix.lower())
    if input_format is None:
        raise SystemExit(f"unknown url list format {url_list.suffix!r}; use one of {sorted(INPUT_FORMATS)}")
    output = Path(args.output)
    if input_format == "json":
        parquet = output.with_name(output.name + "_url_list.parquet")
        output.parent.mkdir(parents=True, exist_ok=True)
        url_list, input_format = json_to_parquet(url_list, parquet, args.url_col, args.caption_col), "parquet"

    from img2dataset import download  # heavy import (pandas, pyarrow, fsspec workers)

    download(
        url_list=str(url_list),
        input_format=input_format,
        url_col=args.url_col,
        caption_col=args.caption_col or None,
        output_format="webdataset",
        output_folder=str(output),
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        encode_quality=args.encode_quality,
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=args.samples_per_shard,
        retries=args.retries,
        timeout=args.timeout,
        enable_wandb=False,
        distributor="multiprocessing",
    )
    print(describe_stats(read_stats_files(output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
