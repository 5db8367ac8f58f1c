"""Annotation-file datasets: COCO Karpathy, Visual Genome captions, cc_sbu_align, VQAv2.

One parser per file format turns annotations into :class:`CaptionRecord` lists; the
same records feed

* the map-style torch datasets here (:class:`CaptionDataset` for training-style items,
  :class:`CaptionEvalDataset` one item per image, :class:`VQADataset`),
* :class:`AnnotationSource`, through which the streaming train loader reads annotation
  data exactly like shards (same shuffling, DP split, skip counting and resume), and
* :func:`annotations_to_shards` (captions) and :func:`vqa_to_shards` (VQA questions
  with answers, for instruction tuning), which write them as img2dataset-style shards.

Image paths are resolved by :class:`ImagePathResolver`, which also repairs the known
Visual Genome layout mismatch (annotations say ``VG_100K/1.jpg`` while the file sits in
``VG_100K_2/``) by searching configured sub-folders for the file name. A missing image
is counted and skipped, never a crash halfway through an epoch.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from blip2_megatron.data.processors import (
    CaptionProcessor,
    ImageDecodeError,
    QuestionProcessor,
    load_rgb,
    open_image,
)
from blip2_megatron.data.wds import ShardWriter, vqa_target

logger = logging.getLogger(__name__)

#: Annotation formats :func:`load_caption_records` reads.
CAPTION_FORMATS = ("coco", "vg", "cc_sbu_align")


@dataclass
class CaptionRecord:
    """One annotated image: its path relative to the image root, reference caption(s), id."""

    image: str
    captions: list[str]
    image_id: str | int


def image_id_from_path(path: str) -> str | int:
    """LAVIS's rule for entries without an id: the number after the file stem's last "_".

    ``val2014/COCO_val2014_000000391895.jpg`` -> 391895 (the id in COCO ground truth);
    a stem without such a number is returned as a string.
    """
    stem = Path(path).stem
    tail = stem.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else stem


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with open(path) as handle:
        return json.load(handle)


def load_caption_records(path: str | Path, annotation_format: str = "coco") -> list[CaptionRecord]:
    """Parse a caption annotation file.

    * ``coco`` / ``vg`` (LAVIS layout): a JSON list of ``{"image": "val2014/x.jpg",
      "caption": str or [refs], "image_id"?: "coco_522418"}``. Ids are kept as given.
    * ``cc_sbu_align`` (MiniGPT-4 stage 2 ``filter_cap.json``): ``{"annotations":
      [{"image_id": "2", "caption": ...}]}`` with the image at ``{image_id}.jpg``.
    """
    if annotation_format not in CAPTION_FORMATS:
        raise ValueError(f"annotation_format={annotation_format!r}; choose one of {CAPTION_FORMATS}")
    data = _read_json(path)
    records = []
    if annotation_format == "cc_sbu_align":
        if not isinstance(data, dict) or "annotations" not in data:
            raise ValueError(f"{path}: expected {{'annotations': [...]}} (cc_sbu_align filter_cap.json)")
        for entry in data["annotations"]:
            image_id = entry["image_id"]
            records.append(CaptionRecord(f"{image_id}.jpg", [entry["caption"]], image_id))
        return records
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image', 'caption'}} entries")
    for index, entry in enumerate(data):
        if "image" not in entry or "caption" not in entry:
            raise ValueError(f"{path}: entry {index} lacks 'image' or 'caption': {entry}")
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        image_id = entry.get("image_id", image_id_from_path(entry["image"]))
        records.append(CaptionRecord(entry["image"], list(captions), image_id))
    return records


class ImagePathResolver:
    """Finds an annotation's image under ``root``, falling back to ``root/<subdir>/<file name>``."""

    def __init__(self, root: str | Path, subdirs: Sequence[str] = ()):
        self.root = Path(root)
        self.subdirs = list(subdirs)

    def resolve(self, relative: str) -> Path | None:
        """The existing file for an annotation path, or None when it is nowhere to be found."""
        direct = self.root / relative
        if direct.is_file():
            return direct
        name = Path(relative).name
        for subdir in self.subdirs:
            candidate = self.root / subdir / name
            if candidate.is_file():
                return candidate
        return None


# ----------------------------------------------------------------------------- streaming


class AnnotationSource:
    """Annotation records as a source of the streaming loader: one unit per image.

    ``read`` yields raw samples in the shard layout that ``wds.unpack_sample``
    understands, so annotation data goes through the same pipeline as shards.
    """

    def __init__(
        self, records: Sequence[CaptionRecord], resolver: ImagePathResolver, name: str = "annotations"
    ):
        self.name = name
        self.units = list(records)
        self.resolver = resolver
        self.num_samples = len(self.units)

    def read(self, record: CaptionRecord, on_error: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
        """One raw sample; a missing file becomes a sample that is counted as "missing_image"."""
        del on_error  # only tar-level errors go there; a missing image is a per-sample skip
        caption = record.captions if len(record.captions) > 1 else record.captions[0]
        raw: dict[str, Any] = {
            "__key__": record.image,
            "json": {"caption": caption, "image_id": record.image_id},
        }
        path = self.resolver.resolve(record.image)
        if path is None:
            raw["__missing_image__"] = str(self.resolver.root / record.image)
        else:
            raw["jpg"] = path.read_bytes()
        yield raw


# ----------------------------------------------------------------------------- map-style


class _AnnotatedImages(Dataset):
    """Records with an ``image`` path: image loading and skip counting shared by the datasets below.

    With ``drop_missing`` records whose file does not exist are dropped when the dataset
    is built (counted in ``skipped["missing_image"]`` and logged once), so an eval set's
    length is final before evaluation starts. Images that fail to load later make
    ``__getitem__`` return None (drop them in the collate function:
    ``loader.collate_drop_none``) and are counted in ``skipped`` of the process that
    read them.
    """

    def __init__(
        self,
        records: Sequence[Any],
        resolver: ImagePathResolver,
        image_processor: Callable[..., torch.Tensor],
        drop_missing: bool,
    ):
        self.records = list(records)
        self.resolver = resolver
        self.image_processor = image_processor
        self.skipped: Counter[str] = Counter()
        if drop_missing:
            present = [record for record in self.records if resolver.resolve(record.image) is not None]
            missing = len(self.records) - len(present)
            if missing:
                self.skipped["missing_image"] += missing
                logger.warning(
                    "%d of %d records have no image under %s", missing, len(self.records), resolver.root
                )
            self.records = present

    def __len__(self) -> int:
        return len(self.records)

    def _load_image(self, record: Any) -> torch.Tensor | None:
        path = self.resolver.resolve(record.image)
        if path is None:
            self.skipped["missing_image"] += 1
            logger.warning("image file not found: %s", self.resolver.root / record.image)
            return None
        try:
            return self.image_processor(path.read_bytes())
        except ImageDecodeError as err:
            self.skipped[err.reason] += 1
            logger.warning("unreadable image %s: %s", path, err)
            return None


class CaptionDataset(_AnnotatedImages):
    """Map-style image-caption pairs for training-style use: one item per record.

    Items are ``{"image", "text_input", "image_id"}``; a record with several captions
    gives one of its first two at random (LAVIS). A missing or unreadable image yields
    None.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        resolver: ImagePathResolver,
        image_processor: Callable[..., torch.Tensor],
        text_processor: CaptionProcessor,
    ):
        super().__init__(records, resolver, image_processor, drop_missing=False)
        self.text_processor = text_processor

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = self._load_image(record)
        if image is None:
            return None
        caption = random.choice(record.captions[:2])
        return {"image": image, "text_input": self.text_processor(caption), "image_id": record.image_id}


class CaptionEvalDataset(_AnnotatedImages):
    """Caption evaluation / retrieval set: one item per image with all its references.

    Items are ``{"image", "image_id", "captions"}`` (references through the text
    processor). Records without an image file are dropped up front and counted.
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        resolver: ImagePathResolver,
        image_processor: Callable[..., torch.Tensor],
        text_processor: CaptionProcessor | None = None,
    ):
        super().__init__(records, resolver, image_processor, drop_missing=True)
        self.text_processor = text_processor or CaptionProcessor()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = self._load_image(record)
        if image is None:
            return None
        captions = [self.text_processor(caption) for caption in record.captions]
        return {"image": image, "image_id": record.image_id, "captions": captions}


@dataclass
class VQARecord:
    """One VQA question about one image."""

    image: str
    question: str
    question_id: int
    image_id: str | int
    answers: list[str]
    answer_type: str = "unknown"
    """"yes/no", "number" or "other" from VQAv2 annotations; "unknown" where the file has none."""


def load_vqa_records(
    questions_path: str | Path,
    annotations_path: str | Path | None = None,
    image_template: str = "val2014/COCO_val2014_{image_id:012d}.jpg",
) -> list[VQARecord]:
    """Parse VQAv2 questions (+ answers when an annotations file is given).

    Two layouts: the official ``{"questions": [{"image_id", "question", "question_id"}]}``
    with ``{"annotations": [{"question_id", "answers": [{"answer"}]}]}``, image paths
    built with ``image_template``; or LAVIS's evaluation list ``[{"question_id",
    "question", "image", "answer": [...]}]`` (answers inline, no annotations file).
    """
    questions = _read_json(questions_path)
    if isinstance(questions, list):
        return [
            VQARecord(
                image=entry["image"],
                question=entry["question"],
                question_id=entry["question_id"],
                image_id=entry.get("image_id", image_id_from_path(entry["image"])),
                answers=list(entry.get("answer", [])),
                answer_type=entry.get("answer_type", "unknown"),
            )
            for entry in questions
        ]
    answers: dict[int, dict[str, Any]] = {}
    if annotations_path:
        answers = {entry["question_id"]: entry for entry in _read_json(annotations_path)["annotations"]}
    records = []
    for entry in questions["questions"]:
        annotation = answers.get(entry["question_id"], {})
        records.append(
            VQARecord(
                image=image_template.format(image_id=entry["image_id"]),
                question=entry["question"],
                question_id=entry["question_id"],
                image_id=entry["image_id"],
                answers=[item["answer"] for item in annotation.get("answers", [])],
                answer_type=annotation.get("answer_type", "unknown"),
            )
        )
    return records


class VQADataset(_AnnotatedImages):
    """VQAv2 evaluation items ``{"image", "text_input" (processed question), "question_id", "image_id", "answers"}``.

    ``text_input`` is the name LAVIS's ``predict_answers`` reads the question from.
    Questions without an image file are dropped up front and counted in ``skipped``.
    """

    def __init__(
        self,
        records: Sequence[VQARecord],
        resolver: ImagePathResolver,
        image_processor: Callable[..., torch.Tensor],
        question_processor: QuestionProcessor | None = None,
    ):
        super().__init__(records, resolver, image_processor, drop_missing=True)
        self.question_processor = question_processor or QuestionProcessor()

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        image = self._load_image(record)
        if image is None:
            return None
        return {
            "image": image,
            "text_input": self.question_processor(record.question),
            "question_id": record.question_id,
            "image_id": record.image_id,
            "answers": record.answers,
        }


# ----------------------------------------------------------------------------- conversion


_PIL_FORMAT_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}


def annotations_to_shards(
    records: Sequence[CaptionRecord],
    resolver: ImagePathResolver,
    out_dir: str | Path,
    samples_per_shard: int = 10000,
    progress: bool = True,
) -> list[Path]:
    """Write annotation records as img2dataset-style shards; returns the shard paths.

    JPEG / PNG / WebP bytes are copied as they are (no re-encoding) after a full decode
    proves them readable; other formats are stored as JPEG (quality 95). Missing files count as ``failed_to_download`` and unreadable ones as
    ``failed_to_resize`` in each shard's ``_stats.json``, as img2dataset counts its
    failures. The json of each sample holds "image_id" and the original "image" path;
    a record with several references keeps them all in "caption" (the ``.txt`` holds
    the first).
    """
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for record in tqdm(records, desc="writing shards", unit="img", disable=not progress):
            image = _shard_image(writer, resolver, record.image)
            if image is None:
                continue
            data, extension, stored = image
            meta = {"image_id": record.image_id, **stored}  # the key order of earlier shards
            if len(record.captions) > 1:
                meta["caption"] = record.captions
            writer.write(data, record.captions[0], meta=meta, image_ext=extension)
        return writer.close()


def _shard_image(
    writer: ShardWriter, resolver: ImagePathResolver, relative: str
) -> tuple[bytes, str, dict[str, Any]] | None:
    """(bytes, extension, metadata) of an image to store, or None after counting why it cannot be.

    JPEG / PNG / WebP bytes are kept as they are once a full decode proves them readable;
    other formats become JPEG (quality 95). The metadata holds the original "image" path
    and the size.
    """
    path = resolver.resolve(relative)
    if path is None:
        writer.record_failure("image file not found")
        return None
    data = path.read_bytes()
    try:
        opened = open_image(data)
        extension = _PIL_FORMAT_EXTENSIONS.get(opened.format or "")
        image = load_rgb(opened)
    except ImageDecodeError as err:
        writer.record_failure(f"image decoding error: {err.reason}", unreadable=True)
        return None
    if extension is None:  # GIF, BMP, TIFF...: not read by the loader, store as JPEG
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        data, extension = buffer.getvalue(), "jpg"
    return data, extension, {"image": relative, "width": image.width, "height": image.height}


def vqa_to_shards(
    records: Sequence[VQARecord],
    resolver: ImagePathResolver,
    out_dir: str | Path,
    samples_per_shard: int = 10000,
    progress: bool = True,
) -> list[Path]:
    """Write VQA questions with answers as img2dataset-style training shards; returns the shard paths.

    One sample per question (an image asked several questions is stored once per
    question, as LAVIS's VQA training sets repeat it). The json holds "question",
    "answers" (every annotator's answer), "question_id", "image_id", "answer_type" and
    the original "image" path; the ``.txt`` (and json "caption") is the training target,
    the most frequent answer (:func:`wds.vqa_target`). Images are stored as by
    :func:`annotations_to_shards`; a question without answers counts as a failure
    ("no answers") in the stats file.
    """
    with ShardWriter(out_dir, samples_per_shard) as writer:
        for record in tqdm(records, desc="writing shards", unit="question", disable=not progress):
            answers = [answer.strip() for answer in record.answers if answer.strip()]
            if not answers:
                writer.record_failure("no answers")
                continue
            image = _shard_image(writer, resolver, record.image)
            if image is None:
                continue
            data, extension, stored = image
            meta = {
                "image_id": record.image_id,
                **stored,
                "question_id": record.question_id,
                "question": record.question,
                "answers": answers,
                "answer_type": record.answer_type,
            }
            writer.write(data, vqa_target(answers), meta=meta, image_ext=extension)
        return writer.close()
