"""Benchmark image decoding + the BLIP-2 train transform: our draft-mode pipeline vs a plain one.

Both pipelines run on the same photo-like JPEGs (quality 90, gradients + texture + noise
so they do not compress trivially) with the same random crops, through a torch
DataLoader with 0, 1, 2 ... workers:

* ``full``: the straightforward pipeline: ``Image.open().convert("RGB")`` (full decode),
  crop, bicubic resize, flip, ToTensor-style normalise with numpy.
* ``ours``: ``ImageTrainProcessor``: crop chosen first, JPEG decoded at the smallest DCT
  scale that keeps the crop >= the output size, resize with the box, normalise in place.

Throughput is images per second after the first batch (worker start-up excluded), the
best of ``--repeats`` runs with the two pipelines taking turns.

With ``--tp N`` it measures instead one rank's train loader (``build_train_loader``, on
webdataset shards of the same JPEGs) decoding every image of its batches, as each TP rank
did before the image path was split, against decoding only its ``ceil(B / N)`` rows and
validating the others (what a TP rank's loader does now).

    python data_tools/bench_loader.py
    python data_tools/bench_loader.py --sizes 224 --workers 0 2 --num-images 256
    python data_tools/bench_loader.py --tp 2 --sizes 364 --workers 0
"""

from __future__ import annotations

import argparse
import io
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from blip2_megatron.data import DataConfig, build_train_loader
from blip2_megatron.data.batch import image_rows
from blip2_megatron.data.processors import (
    CLIP_MEAN,
    CLIP_STD,
    ImageTrainProcessor,
    sample_random_resized_crop,
)
from blip2_megatron.data.wds import ShardWriter

CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


def make_photo(width: int, height: int, seed: int = 0, noise: float = 4.0) -> Image.Image:
    """A photo-like RGB image: smooth gradients, blotchy texture and a little sensor noise.

    Plain gradients compress to almost nothing and pure noise is unlike any photo; this
    mix gives JPEG sizes close to real photos (~0.2 bytes/pixel at quality 90).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack(
        [
            127 + 100 * np.sin(x / width * 7 + y / height * 3 + seed),
            127 + 100 * np.cos(y / height * 5 - seed),
            (x + y) / (width + height) * 255,
        ],
        axis=-1,
    )
    low = rng.normal(0, 40, (height // 16 + 1, width // 16 + 1, 3)) + 128
    blotches = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    pixels = base + np.asarray(blotches, dtype=np.float32) - 128 + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_photo_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """:func:`make_photo` encoded as JPEG."""
    buffer = io.BytesIO()
    make_photo(width, height, seed).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


class FullDecodeTransform:
    """The straightforward pipeline the draft-mode one is compared with."""

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.mean = np.array(CLIP_MEAN, dtype=np.float32)
        self.std = np.array(CLIP_STD, dtype=np.float32)

    def __call__(self, data: bytes, rng: random.Random) -> torch.Tensor:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        box = sample_random_resized_crop(image.width, image.height, CROP_SCALE, CROP_RATIO, rng)
        image = image.crop(box).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = (np.asarray(image, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


class TransformDataset(Dataset):
    """Item i = transform(jpeg i mod n) with a generator seeded by i (same crops for both pipelines)."""

    def __init__(self, jpegs: list[bytes], transform, length: int):
        self.jpegs = jpegs
        self.transform = transform
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.jpegs[index % len(self.jpegs)], random.Random(index))


def images_per_second(dataset: Dataset, workers: int, batch_size: int) -> float:
    """Throughput of one pass; the clock starts after the first batch (worker start-up excluded)."""
    batches = iter(DataLoader(dataset, batch_size=batch_size, num_workers=workers))
    next(batches)
    started = time.perf_counter()
    count = sum(len(batch) for batch in batches)
    return count / (time.perf_counter() - started)


def best_of(datasets: list[Dataset], workers: int, batch_size: int, repeats: int) -> list[float]:
    """Best throughput of each dataset over ``repeats`` rounds, the pipelines taking turns.

    Other load on the machine only ever slows a run down, so the best run is the
    cleanest figure; alternating the pipelines exposes both to the same conditions.
    """
    best = [0.0] * len(datasets)
    for _ in range(repeats):
        for index, dataset in enumerate(datasets):
            best[index] = max(best[index], images_per_second(dataset, workers, batch_size))
    return best


def loader_images_per_second(cfg: DataConfig, rows: list[int] | None, num_batches: int) -> float:
    """Images per second of one DP rank's batches (each batch counted whole) after the first."""
    batches = iter(build_train_loader(cfg, 0, 1, seed=0, image_rows=rows))
    next(batches)
    started = time.perf_counter()
    count = sum(len(batch["image_id"]) for batch in itertools.islice(batches, num_batches - 1))
    return count / (time.perf_counter() - started)


def loader_share_cases(args: argparse.Namespace, shards: Path) -> list[tuple]:
    """Per case: (source, size, workers, all rows img/s, own rows img/s) for TP rank 0 of ``--tp``."""
    results = []
    num_batches = args.num_images // args.batch_size
    own = image_rows(args.batch_size, 0, args.tp)
    for shape in args.images:
        width, height = (int(v) for v in shape.lower().split("x"))
        folder = shards / shape
        with ShardWriter(folder, samples_per_shard=args.num_images) as writer:
            for index in range(args.num_images):
                writer.write(make_photo_jpeg(width, height, index % 8), f"a photo, number {index}")
        kilobytes = (folder / "00000.tar").stat().st_size / args.num_images / 1024
        for size, workers in itertools.product(args.sizes, args.workers):
            cfg = DataConfig(
                kind="wds",
                train_shards=[str(folder / "00000.tar")],
                image_size=size,
                batch_size=args.batch_size,
                num_workers=workers,
                train_augment=True,
                samples_per_epoch=args.num_images,
            )
            best = [0.0, 0.0]
            for _ in range(args.repeats):
                for index, rows in enumerate((None, own)):
                    best[index] = max(best[index], loader_images_per_second(cfg, rows, num_batches))
            results.append((f"{shape} ({kilobytes:.0f} KB)", size, workers, *best))
    return results


def main_tp(args: argparse.Namespace) -> int:
    own = image_rows(args.batch_size, 0, args.tp)
    with tempfile.TemporaryDirectory() as tmp:
        rows = loader_share_cases(args, Path(tmp))
    print(
        f"\none rank's train loader, batches of {args.batch_size}: every image decoded vs TP rank 0 of "
        f"{args.tp} decoding its {len(own)} (the rest validated at 1/8 scale)"
    )
    print(
        f"{'source JPEG':<22} {'out':>4} {'workers':>7} {'all img/s':>10} {'own rows img/s':>15} {'ratio':>6}"
    )
    for source, size, workers, whole, shared in rows:
        print(f"{source:<22} {size:>4} {workers:>7} {whole:>10.1f} {shared:>15.1f} {shared / whole:>5.2f}x")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 364], help="output sides in pixels")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument(
        "--images", nargs="+", default=["640x480", "1600x1200"], help="source JPEG sizes, WIDTHxHEIGHT"
    )
    parser.add_argument("--num-images", type=int, default=128, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=16, help="DataLoader batch size")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts")
    parser.add_argument(
        "--tp",
        type=int,
        default=None,
        help="measure one rank's train loader: every image of its batches vs TP rank 0's share",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_images < 2 * args.batch_size:
        raise SystemExit("--num-images must be at least twice --batch-size (the first batch is not timed)")
    torch.set_num_threads(1)  # the transforms are single-threaded; keep the main process comparable
    if args.tp is not None:
        if args.tp < 2:
            raise SystemExit("--tp must be at least 2")
        return main_tp(args)
    rows = []
    cases = [
        (shape, size, workers) for shape in args.images for size in args.sizes for workers in args.workers
    ]
    jpegs_by_shape = {}
    for shape in args.images:
        width, height = (int(v) for v in shape.lower().split("x"))
        jpegs_by_shape[shape] = [make_photo_jpeg(width, height, seed) for seed in range(8)]
    for shape, size, workers in tqdm(cases, desc="benchmark", unit="case"):
        jpegs = jpegs_by_shape[shape]
        datasets = [
            TransformDataset(jpegs, transform, args.num_images)
            for transform in (FullDecodeTransform(size), ImageTrainProcessor(size))
        ]
        full, ours = best_of(datasets, workers, args.batch_size, args.repeats)
        kilobytes = sum(len(jpeg) for jpeg in jpegs) / len(jpegs) / 1024
        rows.append((f"{shape} ({kilobytes:.0f} KB)", size, workers, full, ours))

    print(
        f"\n{'source JPEG':<22} {'out':>4} {'workers':>7} {'full img/s':>11} {'ours img/s':>11} {'ratio':>6}"
    )
    for source, size, workers, full, ours in rows:
        print(f"{source:<22} {size:>4} {workers:>7} {full:>11.1f} {ours:>11.1f} {ours / full:>5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
