"""The built-in dataset of the embedded default job: synthetic shapes with exact captions.

Each image is a small picture (64 x 64 by default) of one shape (circle, square,
triangle) in one of six colours, small or large, on the left, right, top, bottom or in
the centre of a noisy pastel background. Its caption is a function of that content,
written in one of several phrasings ("a red circle on the left", "a small blue square at
the top", ...), so a tiny model trained for a few minutes on a CPU measurably learns to
caption it. Some (shape, colour) pairs never occur in training; the val / test images
include them (flagged ``"held_out": true``) to show whether attributes are learnt
separately.

Layout under ``root`` (everything deterministic for a seed):

    train/00000.tar ...       img2dataset-style shards ({key}.jpg, .txt, .json) + _stats.json
    images/{val,test}/*.jpg   eval images
    val.json, test.json       LAVIS Karpathy-style: [{"image", "caption": [refs], "image_id", "held_out"}]
    val_gt.json, test_gt.json COCO caption ground truth (pycocotools / pycocoevalcap COCO())
    manifest.json             the parameters it was built with; written last
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from blip2_megatron.data.wds import ShardWriter

logger = logging.getLogger(__name__)

#: Bumped whenever generation changes, so an old dataset on disk is not silently reused.
FORMAT_VERSION = 1

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 175),
    "orange": (240, 135, 25),
}
#: Shape radius as a fraction of the image side.
SIZES = {"small": 0.11, "large": 0.22}
#: Shape centre (x, y) as fractions of the image side, and how captions say it.
POSITIONS = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "center": ((0.5, 0.5), "in the center"),
}
#: Caption phrasings; eval references are all of them, a training sample gets one at random.
TEMPLATES = (
    "a {colour} {shape} {where}",
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape}",
    "a {colour} {shape} {where} on a plain background",
)
_AN_BEFORE_VOWEL = re.compile(r"\ba ([aeiou])")  # "a orange circle" -> "an orange circle"
#: (shape, colour) pairs that only appear in val / test.
HELD_OUT = frozenset({("triangle", "blue"), ("circle", "orange"), ("square", "purple")})


@dataclass(frozen=True)
class ShapeScene:
    """The content of one image, which fully determines its captions."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def held_out(self) -> bool:
        return (self.shape, self.colour) in HELD_OUT

    def caption(self, template: str) -> str:
        where = POSITIONS[self.position][1]
        text = template.format(colour=self.colour, shape=self.shape, size=self.size, where=where)
        return _AN_BEFORE_VOWEL.sub(r"an \1", text)

    def captions(self) -> list[str]:
        return [self.caption(template) for template in TEMPLATES]


@dataclass(frozen=True)
class SampleDatasetPaths:
    """Where :func:`ensure_sample_dataset` put things."""

    root: Path
    train_shards: str
    """Brace pattern of the training shards."""
    num_train: int
    image_root: Path
    """Root the "image" paths of val.json / test.json are relative to."""
    val_annotation: Path
    test_annotation: Path
    val_gt: Path
    test_gt: Path


def random_scene(rng: np.random.Generator, allow_held_out: bool) -> ShapeScene:
    """Draw a scene uniformly, re-drawing held-out (shape, colour) pairs for training."""
    while True:
        scene = ShapeScene(
            shape=SHAPES[rng.integers(len(SHAPES))],
            colour=list(COLOURS)[rng.integers(len(COLOURS))],
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=list(POSITIONS)[rng.integers(len(POSITIONS))],
        )
        if allow_held_out or not scene.held_out:
            return scene


def render_scene(scene: ShapeScene, rng: np.random.Generator, image_size: int = 64) -> Image.Image:
    """Draw a scene: pastel background with pixel noise, the shape slightly jittered."""
    # Draw at 4x and downsample for anti-aliased edges.
    scale = 4
    side = image_size * scale
    background = tuple(int(v) for v in rng.integers(175, 250, size=3))
    canvas = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(canvas)
    (fx, fy), _ = POSITIONS[scene.position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    cx, cy = (fx + jitter[0]) * side, (fy + jitter[1]) * side
    radius = SIZES[scene.size] * side * rng.uniform(0.9, 1.1)
    colour = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif scene.shape == "square":
        half = radius * 0.9
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    else:
        points = [
            (cx + radius * math.cos(angle), cy + radius * math.sin(angle))
            for angle in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)
        ]
        draw.polygon(points, fill=colour)
    image = np.asarray(canvas.resize((image_size, image_size), Image.Resampling.LANCZOS), dtype=np.float32)
    image = image + rng.normal(0.0, 6.0, size=image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def _write_eval_split(
    root: Path, split: str, count: int, first_id: int, rng: np.random.Generator, image_size: int
) -> None:
    """Images of one eval split plus its Karpathy-style json and COCO ground truth."""
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    entries, gt_images, gt_annotations = [], [], []
    for offset in range(count):
        image_id = first_id + offset
        scene = random_scene(rng, allow_held_out=True)
        relative = f"{split}/{image_id:06d}.jpg"
        (root / "images" / relative).write_bytes(_jpeg_bytes(render_scene(scene, rng, image_size)))
        captions = scene.captions()
        entries.append(
            {"image": relative, "caption": captions, "image_id": image_id, "held_out": scene.held_out}
        )
        gt_images.append({"id": image_id, "file_name": relative, "width": image_size, "height": image_size})
        for caption in captions:
            gt_annotations.append({"image_id": image_id, "caption": caption, "id": len(gt_annotations) + 1})
    (root / f"{split}.json").write_text(json.dumps(entries, indent=1))
    ground_truth = {
        "info": {"description": f"blip2-megatron synthetic shapes, {split} split"},
        "licenses": [],
        "type": "captions",
        "images": gt_images,
        "annotations": gt_annotations,
    }
    (root / f"{split}_gt.json").write_text(json.dumps(ground_truth))


def build_sample_dataset(
    root: Path,
    seed: int,
    num_train: int,
    num_val: int,
    num_test: int,
    image_size: int,
    num_shards: int,
    progress: bool = False,
) -> None:
    """Generate the dataset into ``root`` (which must not exist yet)."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_shard = math.ceil(num_train / num_shards)
    with ShardWriter(root / "train", samples_per_shard=per_shard) as writer:
        for index in tqdm(range(num_train), desc="sample dataset", unit="img", disable=not progress):
            scene = random_scene(rng, allow_held_out=False)
            caption = scene.caption(TEMPLATES[rng.integers(len(TEMPLATES))])
            meta = {"image_id": f"train_{index:06d}", **asdict(scene)}
            writer.write(_jpeg_bytes(render_scene(scene, rng, image_size)), caption, meta=meta)
    # Separate generators per split, so changing num_train leaves val / test unchanged.
    _write_eval_split(root, "val", num_val, 1, np.random.default_rng([seed, 1]), image_size)
    _write_eval_split(root, "test", num_test, 100001, np.random.default_rng([seed, 2]), image_size)


def _paths(root: Path, num_train: int, num_shards: int) -> SampleDatasetPaths:
    last = num_shards - 1
    return SampleDatasetPaths(
        root=root,
        train_shards=str(root / "train" / f"{{00000..{last:05d}}}.tar"),
        num_train=num_train,
        image_root=root / "images",
        val_annotation=root / "val.json",
        test_annotation=root / "test.json",
        val_gt=root / "val_gt.json",
        test_gt=root / "test_gt.json",
    )


def load_sample_dataset(root: str | Path) -> SampleDatasetPaths:
    """Paths of the sample dataset already built under ``root``, whatever its parameters."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no sample dataset at {root} (no manifest.json)")
    params = json.loads(manifest.read_text())
    return _paths(Path(root), params["num_train"], params["num_shards"])


def ensure_sample_dataset(
    root: str | Path,
    seed: int = 0,
    num_train: int = 4000,
    num_val: int = 150,
    num_test: int = 150,
    image_size: int = 64,
    num_shards: int = 8,
    progress: bool = False,
) -> SampleDatasetPaths:
    """Build the sample dataset under ``root`` unless it is already there; return its paths.

    Safe to call from every rank at once: each builder writes a private temporary folder
    and renames it to ``root`` (atomic); a builder that loses the race discards its copy.
    A crash therefore never leaves a half dataset at ``root``. An existing ``root`` built
    with other parameters is an error (delete it or pick another root) rather than being
    overwritten. ``progress`` shows a progress bar while generating.
    """
    root = Path(root)
    if num_train < num_shards:
        raise ValueError(f"num_train={num_train} must be >= num_shards={num_shards}")
    # Drop trailing empty shards: ceil division can leave the last ones unused.
    num_shards = math.ceil(num_train / math.ceil(num_train / num_shards))
    params = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "num_test": num_test,
        "image_size": image_size,
        "num_shards": num_shards,
    }
    manifest = root / "manifest.json"
    if not root.exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        staging = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        logger.info("generating the sample dataset (%d train images) in %s", num_train, root)
        try:
            build_sample_dataset(
                staging, seed, num_train, num_val, num_test, image_size, num_shards, progress
            )
            (staging / "manifest.json").write_text(json.dumps(params, indent=1))
            os.rename(staging, root)
        except OSError:
            if not manifest.is_file():  # not lost to a concurrent builder: a real failure
                raise
            logger.info("another process built %s first", root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not manifest.is_file():
        raise FileExistsError(f"{root} exists but is not a sample dataset (no manifest.json); remove it")
    found = json.loads(manifest.read_text())
    if found != params:
        raise ValueError(
            f"{root} holds a sample dataset built with {found}, not {params}; remove it or choose another root"
        )
    return _paths(root, num_train, num_shards)
