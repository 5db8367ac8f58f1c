"""The built-in dataset of the embedded default job: synthetic shapes with exact captions.

Each image is a small picture (64 x 64 by default) of one shape (circle, square,
triangle) in one of six colours, small or large, on the left, right, top, bottom or in
the centre of a noisy pastel background. Its caption is a function of that content,
written in one of several phrasings ("a red circle on the left", "a small blue square at
the top", ...), so a tiny model trained for a few minutes on a CPU measurably learns to
caption it. Some (shape, colour) pairs never occur in training; the val / test images
include them (flagged ``"held_out": true``) to show whether attributes are learnt
separately.

Besides captions, every format a shipped job reads has a built-in counterpart, so each
job runs at tiny size on this data: a second shard source (mixed sources, MiniGPT-4
stage 1), a COCO-Karpathy training file with LAVIS's string ids ("coco_12"), VQAv2
questions and annotations with answer types (colour / shape: "other", position:
"yes/no", count: "number"), and MiniGPT-4's cc_sbu_align layout with longer descriptions.
For instruction tuning (InstructBLIP: ``data.source_tasks``) the VQA questions and the
descriptions also come as training shards: one question about every fourth training image
(ten annotator answers, most of them right: the target is the most frequent one), and the
cc_sbu_align pairs.

Layout under ``root`` (everything deterministic for a seed):

    train/00000.tar ...       img2dataset-style shards ({key}.jpg, .txt, .json) + _stats.json
    extra/00000.tar ...       a second, smaller shard source (other captions of other scenes)
    images/{val,test}/*.jpg   eval images
    images/coco_train/*.jpg   images of coco_train.json
    val.json, test.json       LAVIS Karpathy-style: [{"image", "caption": [refs], "image_id", "held_out"}]
    val_gt.json, test_gt.json COCO caption ground truth (pycocotools / pycocoevalcap COCO())
    coco_train.json           Karpathy train layout: [{"image", "caption", "image_id": "coco_N"}]
    vqa/questions_val.json    VQAv2 official layout over the val images (image paths:
    vqa/annotations_val.json  ``val/{image_id:06d}.jpg`` under images/)
    cc_sbu_align/filter_cap.json, cc_sbu_align/image/{id}.jpg   MiniGPT-4 stage 2 layout
    vqa_train/00000.tar ...   VQA training shards over train images: json "question", "answers"
                              (10), "answer_type"; .txt = the most frequent answer
    cc_sbu_align_wds/00000.tar ...  the cc_sbu_align descriptions as shards (.txt = description)
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

from blip2_megatron.data.annotations import ImagePathResolver, annotations_to_shards, load_caption_records
from blip2_megatron.data.wds import ShardWriter, iter_shard_samples, vqa_target

logger = logging.getLogger(__name__)

#: Bumped whenever generation changes, so an old dataset on disk is not silently reused.
FORMAT_VERSION = 3

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
#: MiniGPT-4-style detailed descriptions (cc_sbu_align).
DESCRIPTIONS = (
    "The image shows a {size} {colour} {shape} {where}. The rest of the picture is a plain pastel "
    "background with a little noise, and there is nothing else in it.",
    "In this picture there is a single {colour} {shape}, {size} and placed {where}. No other object "
    "is visible; the background is a light, even colour.",
)
#: VQA image paths of the built-in data, relative to images/ (``data.vqa_image_template``).
VQA_IMAGE_TEMPLATE = "val/{image_id:06d}.jpg"
COCO_TRAIN_IMAGES = 800
CC_SBU_ALIGN_IMAGES = 200
#: One VQA training question is asked about every this many training images.
VQA_TRAIN_EVERY = 4
#: Shards of the VQA training source and of the cc_sbu_align shards (two: two readers can share them).
SMALL_SOURCE_SHARDS = 2


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

    def questions(self, rng: np.random.Generator) -> list[tuple[str, str, str]]:
        """VQA (question, answer, answer type) about this scene: colour, shape, position, count."""
        asked = list(POSITIONS)[rng.integers(len(POSITIONS))]
        where = POSITIONS[asked][1]
        return [
            (f"what color is the {self.shape}?", self.colour, "other"),
            ("what shape is in the picture?", self.shape, "other"),
            (f"is the {self.shape} {where}?", "yes" if asked == self.position else "no", "yes/no"),
            ("how many shapes are there?", "1", "number"),
        ]


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
    extra_shards: str
    """Brace pattern of the second shard source."""
    coco_train_annotation: Path
    """Karpathy-layout training captions (images under image_root)."""
    vqa_questions: Path
    vqa_annotations: Path
    vqa_image_template: str
    """VQA image paths under image_root, by image id."""
    cc_sbu_align_annotation: Path
    """MiniGPT-4 stage-2 filter_cap.json (images in the image/ folder beside it)."""
    vqa_train_shards: str
    """Brace pattern of the VQA training shards (json "question" / "answers"; data.source_tasks "vqa")."""
    conversation_shards: str
    """Brace pattern of the cc_sbu_align descriptions as shards (data.source_tasks "conversation")."""


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
            {
                "image": relative,
                "caption": captions,
                "image_id": image_id,
                "held_out": scene.held_out,
                "scene": scene,
            }
        )
        gt_images.append({"id": image_id, "file_name": relative, "width": image_size, "height": image_size})
        for caption in captions:
            gt_annotations.append({"image_id": image_id, "caption": caption, "id": len(gt_annotations) + 1})
    (root / f"{split}.json").write_text(
        json.dumps([{k: v for k, v in entry.items() if k != "scene"} for entry in entries], indent=1)
    )
    ground_truth = {
        "info": {"description": f"blip2-megatron synthetic shapes, {split} split"},
        "licenses": [],
        "type": "captions",
        "images": gt_images,
        "annotations": gt_annotations,
    }
    (root / f"{split}_gt.json").write_text(json.dumps(ground_truth))
    if split == "val":
        _write_vqa(root, entries, np.random.default_rng([first_id, count]))


def _write_vqa(root: Path, val_entries: list[dict], rng: np.random.Generator) -> None:
    """VQAv2's official question and annotation files over the val images (10 answers each, as VQAv2)."""
    questions, annotations = [], []
    for entry in val_entries:
        scene = entry["scene"]
        for index, (question, answer, answer_type) in enumerate(scene.questions(rng)):
            question_id = entry["image_id"] * 10 + index
            questions.append(
                {"image_id": entry["image_id"], "question": question, "question_id": question_id}
            )
            annotations.append(
                {
                    "question_id": question_id,
                    "image_id": entry["image_id"],
                    "answer_type": answer_type,
                    "multiple_choice_answer": answer,
                    "answers": [{"answer": answer, "answer_id": i + 1} for i in range(10)],
                }
            )
    (root / "vqa").mkdir()
    (root / "vqa" / "questions_val.json").write_text(json.dumps({"questions": questions}))
    (root / "vqa" / "annotations_val.json").write_text(json.dumps({"annotations": annotations}))


def _write_coco_train(root: Path, count: int, rng: np.random.Generator, image_size: int) -> None:
    """Karpathy-layout training captions with LAVIS's string image ids."""
    (root / "images" / "coco_train").mkdir(parents=True)
    entries = []
    for index in range(count):
        scene = random_scene(rng, allow_held_out=False)
        relative = f"coco_train/{index:06d}.jpg"
        (root / "images" / relative).write_bytes(_jpeg_bytes(render_scene(scene, rng, image_size)))
        caption = scene.caption(TEMPLATES[rng.integers(len(TEMPLATES))])
        entries.append({"image": relative, "caption": caption, "image_id": f"coco_{index}"})
    (root / "coco_train.json").write_text(json.dumps(entries, indent=1))


def _write_cc_sbu_align(root: Path, count: int, rng: np.random.Generator, image_size: int) -> None:
    """MiniGPT-4's stage-2 layout: filter_cap.json + image/{image_id}.jpg with detailed descriptions."""
    folder = root / "cc_sbu_align"
    (folder / "image").mkdir(parents=True)
    annotations = []
    for index in range(count):
        scene = random_scene(rng, allow_held_out=False)
        (folder / "image" / f"{index}.jpg").write_bytes(_jpeg_bytes(render_scene(scene, rng, image_size)))
        template = DESCRIPTIONS[rng.integers(len(DESCRIPTIONS))]
        where = POSITIONS[scene.position][1]
        text = template.format(size=scene.size, colour=scene.colour, shape=scene.shape, where=where)
        annotations.append({"image_id": str(index), "caption": text})
    (folder / "filter_cap.json").write_text(json.dumps({"annotations": annotations}, indent=1))


def _distractor(answer: str, rng: np.random.Generator) -> str:
    """A wrong answer of the same kind (another colour or shape, the other of yes / no, a count)."""
    for values in (list(COLOURS), list(SHAPES), ["yes", "no"]):
        if answer in values:
            others = [value for value in values if value != answer]
            return others[rng.integers(len(others))]
    return str(int(answer) + 1) if answer.isdigit() else "unknown"


def _write_vqa_train(root: Path, rng: np.random.Generator) -> None:
    """VQA training shards: one question (VQA val style) about every VQA_TRAIN_EVERY-th train image.

    The images are the train shards' own bytes, read back in shard order. Each question
    has ten annotator answers, seven to ten of them right and the rest one wrong answer of
    the same kind, in random order: the target (the ``.txt``) is the most frequent answer.
    """
    train = sorted((root / "train").glob("*.tar"))
    images = (raw for url in train for raw in iter_shard_samples(str(url), on_error=lambda exn: False))
    chosen = [raw for index, raw in enumerate(images) if index % VQA_TRAIN_EVERY == 0]
    per_shard, _ = _shard_layout(len(chosen), SMALL_SOURCE_SHARDS)
    with ShardWriter(root / "vqa_train", samples_per_shard=per_shard) as writer:
        for index, raw in enumerate(chosen):
            meta = json.loads(raw["json"])
            scene = ShapeScene(meta["shape"], meta["colour"], meta["size"], meta["position"])
            questions = scene.questions(rng)
            question, answer, answer_type = questions[rng.integers(len(questions))]
            right = int(rng.integers(7, 11))
            answers = [answer] * right + [_distractor(answer, rng)] * (10 - right)
            answers = [answers[i] for i in rng.permutation(len(answers))]
            record = {
                "image_id": f"vqa_train_{index:06d}",
                "question_id": index,
                "question": question,
                "answers": answers,
                "answer_type": answer_type,
                **asdict(scene),
            }
            writer.write(raw["jpg"], vqa_target(answers), meta=record)


def _write_conversation_shards(root: Path) -> None:
    """The cc_sbu_align descriptions as img2dataset-style shards (the conversation source)."""
    folder = root / "cc_sbu_align"
    records = load_caption_records(folder / "filter_cap.json", "cc_sbu_align")
    per_shard, _ = _shard_layout(len(records), SMALL_SOURCE_SHARDS)
    annotations_to_shards(
        records, ImagePathResolver(folder / "image"), root / "cc_sbu_align_wds", per_shard, progress=False
    )


def _shard_layout(count: int, wanted: int) -> tuple[int, int]:
    """(samples per shard, shards) of ``count`` samples spread over at most ``wanted`` shards."""
    per_shard = max(1, math.ceil(count / wanted))
    return per_shard, max(1, math.ceil(count / per_shard))


def _write_shards(
    folder: Path,
    prefix: str,
    count: int,
    num_shards: int,
    rng: np.random.Generator,
    image_size: int,
    progress: bool,
) -> None:
    with ShardWriter(folder, samples_per_shard=math.ceil(count / num_shards)) as writer:
        for index in tqdm(
            range(count), desc=f"sample dataset ({folder.name})", unit="img", disable=not progress
        ):
            scene = random_scene(rng, allow_held_out=False)
            caption = scene.caption(TEMPLATES[rng.integers(len(TEMPLATES))])
            meta = {"image_id": f"{prefix}_{index:06d}", **asdict(scene)}
            writer.write(_jpeg_bytes(render_scene(scene, rng, image_size)), caption, meta=meta)


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
    _write_shards(
        root / "train", "train", num_train, num_shards, np.random.default_rng(seed), image_size, progress
    )
    # Separate generators per part, so changing num_train leaves the others unchanged.
    _write_eval_split(root, "val", num_val, 1, np.random.default_rng([seed, 1]), image_size)
    _write_eval_split(root, "test", num_test, 100001, np.random.default_rng([seed, 2]), image_size)
    extra = max(num_train // 4, 2)
    _write_shards(root / "extra", "extra", extra, 2, np.random.default_rng([seed, 3]), image_size, progress)
    _write_coco_train(root, COCO_TRAIN_IMAGES, np.random.default_rng([seed, 4]), image_size)
    _write_cc_sbu_align(root, CC_SBU_ALIGN_IMAGES, np.random.default_rng([seed, 5]), image_size)
    _write_vqa_train(root, np.random.default_rng([seed, 6]))
    _write_conversation_shards(root)


def _pattern(folder: Path, shards: int) -> str:
    return str(folder / f"{{00000..{shards - 1:05d}}}.tar")


def _paths(root: Path, num_train: int, num_shards: int) -> SampleDatasetPaths:
    last = num_shards - 1
    _, vqa_shards = _shard_layout(len(range(0, num_train, VQA_TRAIN_EVERY)), SMALL_SOURCE_SHARDS)
    _, conversation_shards = _shard_layout(CC_SBU_ALIGN_IMAGES, SMALL_SOURCE_SHARDS)
    return SampleDatasetPaths(
        root=root,
        train_shards=str(root / "train" / f"{{00000..{last:05d}}}.tar"),
        num_train=num_train,
        image_root=root / "images",
        val_annotation=root / "val.json",
        test_annotation=root / "test.json",
        val_gt=root / "val_gt.json",
        test_gt=root / "test_gt.json",
        extra_shards=str(root / "extra" / "{00000..00001}.tar"),
        coco_train_annotation=root / "coco_train.json",
        vqa_questions=root / "vqa" / "questions_val.json",
        vqa_annotations=root / "vqa" / "annotations_val.json",
        vqa_image_template=VQA_IMAGE_TEMPLATE,
        cc_sbu_align_annotation=root / "cc_sbu_align" / "filter_cap.json",
        vqa_train_shards=_pattern(root / "vqa_train", vqa_shards),
        conversation_shards=_pattern(root / "cc_sbu_align_wds", conversation_shards),
    )


def load_sample_dataset(root: str | Path) -> SampleDatasetPaths:
    """Paths of the sample dataset already built under ``root``, whatever its parameters."""
    manifest = Path(root) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"no sample dataset at {root} (no manifest.json)")
    params = json.loads(manifest.read_text())
    if params.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"the sample dataset at {root} has format version {params.get('format_version')}, this code "
            f"writes {FORMAT_VERSION} (it adds files the jobs read); delete {root} and it is rebuilt on the next run"
        )
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
