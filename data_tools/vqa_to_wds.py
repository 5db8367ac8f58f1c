"""Convert VQAv2 questions + annotations + images into webdataset training shards (instruction tuning).

One sample per question, in img2dataset's layout (``{key}.jpg`` / ``.txt`` / ``.json`` plus
``NNNNN_stats.json``): the json carries "question", "answers" (all annotators'),
"question_id", "image_id" and "answer_type"; the ``.txt`` is the training target, the
most frequent answer. A source of such shards is trained with ``data.source_tasks``
"vqa". Missing images count as failed_to_download, unreadable ones as failed_to_resize.

    python data_tools/vqa_to_wds.py --questions v2_OpenEnded_mscoco_train2014_questions.json \\
        --annotations v2_mscoco_train2014_annotations.json --image-root /data/coco/images \\
        --output /data/vqav2_train_wds
"""

from __future__ import annotations

import argparse
import sys

from blip2_megatron.data.annotations import ImagePathResolver, load_vqa_records, vqa_to_shards
from blip2_megatron.data.wds import describe_stats, read_stats_files

DEFAULT_IMAGE_TEMPLATE = "train2014/COCO_train2014_{image_id:012d}.jpg"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--questions", required=True, help="VQAv2 questions json (or LAVIS's list with inline 'answer')"
    )
    parser.add_argument(
        "--annotations", default="", help="VQAv2 annotations json with the answers (not for LAVIS's list)"
    )
    parser.add_argument("--image-root", required=True, help="folder the image paths are relative to")
    parser.add_argument(
        "--image-template",
        default=DEFAULT_IMAGE_TEMPLATE,
        help=f"image path under --image-root from a question's image_id (default: {DEFAULT_IMAGE_TEMPLATE})",
    )
    parser.add_argument("--output", required=True, help="output folder for the shards")
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="samples per tar shard")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    records = load_vqa_records(args.questions, args.annotations or None, args.image_template)
    if not any(record.answers for record in records):
        print(
            f"error: no question in {args.questions} has answers; training shards need them "
            "(pass --annotations with the VQAv2 annotations file)",
            file=sys.stderr,
        )
        return 2
    shards = vqa_to_shards(records, ImagePathResolver(args.image_root), args.output, args.samples_per_shard)
    print(f"wrote {len(shards)} shard(s) of {len(records)} question(s) to {args.output}")
    print(describe_stats(read_stats_files(args.output)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
