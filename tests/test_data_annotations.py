"""Annotation datasets: COCO Karpathy, VG path repair, cc_sbu_align, VQAv2; missing images counted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from data_helpers import jpeg_bytes

from blip2_megatron.data import (
    CaptionDataset,
    CaptionEvalDataset,
    CaptionProcessor,
    DataConfig,
    EvalLoader,
    ImageEvalProcessor,
    ImagePathResolver,
    VQADataset,
    build_eval_dataset,
    build_train_loader,
    collate_drop_none,
    load_caption_records,
    load_vqa_records,
)
from blip2_megatron.data.annotations import annotations_to_shards
from blip2_megatron.data.wds import read_stats_files


def write_images(root: Path, relative_paths, size=(24, 20)) -> None:
    for index, relative in enumerate(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(*size, seed=index))


@pytest.fixture
def coco(tmp_path):
    """A Karpathy-style COCO layout: 9 train entries (one image missing), 3 val images (one missing)."""
    root = tmp_path / "coco"
    train_images = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(1, 10)]
    write_images(root, train_images[:-1])  # the last one is missing on disk
    train = [
        {"caption": f"A dog number {i}.", "image": image, "image_id": f"coco_{i}"}
        for i, image in enumerate(train_images, start=1)
    ]
    val_images = [f"val2014/COCO_val2014_{i:012d}.jpg" for i in (391895, 522418, 184613)]
    write_images(root, val_images[:2])
    val = [{"image": image, "caption": [f"ref {j} of {image}" for j in range(5)]} for image in val_images]
    (tmp_path / "coco_karpathy_train.json").write_text(json.dumps(train))
    (tmp_path / "coco_karpathy_val.json").write_text(json.dumps(val))
    return tmp_path, root


def test_karpathy_records_keep_string_ids_and_derive_val_ids(coco):
    folder, _ = coco
    train = load_caption_records(folder / "coco_karpathy_train.json")
    assert train[0].image_id == "coco_1" and train[0].captions == ["A dog number 1."]
    val = load_caption_records(folder / "coco_karpathy_val.json")
    assert [record.image_id for record in val] == [391895, 522418, 184613]
    assert len(val[0].captions) == 5
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_caption_records(folder / "nowhere.json")


def test_coco_train_loader_counts_the_missing_image(coco):
    folder, root = coco
    cfg = DataConfig(
        kind="coco",
        train_annotation=str(folder / "coco_karpathy_train.json"),
        image_root=str(root),
        image_size=16,
        batch_size=4,
        num_workers=0,
        samples_per_epoch=16,
    )
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    batches = list(loader)
    ids = [sample for batch in batches for sample in batch["image_id"]]
    assert len(ids) == 16 and set(ids) <= {f"coco_{i}" for i in range(1, 9)}
    assert loader.stats["missing_image"] >= 1  # 16 good samples need two passes over 8 present images
    assert batches[0]["text_input"][0].startswith("a dog number ")


def test_caption_eval_dataset_drops_missing_and_unreadable_images(coco):
    folder, root = coco
    (root / "val2014/COCO_val2014_000000522418.jpg").write_bytes(b"corrupt")
    records = load_caption_records(folder / "coco_karpathy_val.json")
    dataset = CaptionEvalDataset(records, ImagePathResolver(root), ImageEvalProcessor(32))
    assert len(dataset) == 2 and dataset.skipped == {"missing_image": 1}
    loader = EvalLoader(dataset, batch_size=4)
    batches = list(loader)
    assert len(batches) == 1 and batches[0]["image_id"] == [391895]
    assert batches[0]["image"].shape == (1, 3, 32, 32)
    assert batches[0]["captions"][0][0] == "ref 0 of val2014/coco_val2014_000000391895 jpg"
    assert loader.stats == {"missing_image": 1, "unreadable_image": 1}


def test_collate_drops_none_items():
    item = {"image": torch.zeros(3, 2, 2), "image_id": "x"}
    batch = collate_drop_none([None, item, None])
    assert batch["num_dropped"] == 2 and batch["image"].shape == (1, 3, 2, 2) and batch["image_id"] == ["x"]
    assert collate_drop_none([None]) == {"num_dropped": 1}


def test_caption_dataset_map_style(coco):
    folder, root = coco
    records = load_caption_records(folder / "coco_karpathy_train.json")
    dataset = CaptionDataset(
        records, ImagePathResolver(root), ImageEvalProcessor(16), CaptionProcessor("a photo of ")
    )
    assert dataset[0]["text_input"] == "a photo of a dog number 1"
    assert dataset[8] is None and dataset.skipped == {"missing_image": 1}


def test_visual_genome_paths_are_repaired_by_searching_subdirs(tmp_path):
    write_images(tmp_path, ["VG_100K/1.jpg", "VG_100K_2/2.jpg"])
    annotations = [
        {"image": "VG_100K/1.jpg", "caption": "a tree", "image_id": 1},
        {"image": "VG_100K/2.jpg", "caption": "a car", "image_id": 2},  # really in VG_100K_2
        {"image": "vg/images/2.jpg", "caption": "a red car", "image_id": 2},  # another prefix
    ]
    (tmp_path / "vg_caption.json").write_text(json.dumps(annotations))
    records = load_caption_records(tmp_path / "vg_caption.json", "vg")
    plain = ImagePathResolver(tmp_path)
    assert plain.resolve("VG_100K/1.jpg") == tmp_path / "VG_100K/1.jpg"
    assert plain.resolve("VG_100K/2.jpg") is None
    searching = ImagePathResolver(tmp_path, ["VG_100K", "VG_100K_2"])
    assert [searching.resolve(record.image) for record in records] == [
        tmp_path / "VG_100K/1.jpg",
        tmp_path / "VG_100K_2/2.jpg",
        tmp_path / "VG_100K_2/2.jpg",
    ]
    cfg = DataConfig(
        kind="vg",
        train_annotation=str(tmp_path / "vg_caption.json"),
        image_root=str(tmp_path),
        image_subdirs=["VG_100K", "VG_100K_2"],
        image_size=16,
        batch_size=3,
        num_workers=0,
    )
    loader = build_train_loader(cfg, 0, 1, seed=0)
    assert sorted(next(iter(loader))["image_id"]) == [1, 2, 2] and loader.stats == {}


def test_cc_sbu_align_with_default_image_folder(tmp_path):
    folder = tmp_path / "cc_sbu_align"
    write_images(folder / "image", ["2.jpg", "5.jpg", "9.jpg"])
    annotations = {
        "annotations": [{"image_id": i, "caption": f"The image shows thing {i}."} for i in ("2", "5", "9")]
    }
    (folder / "filter_cap.json").write_text(json.dumps(annotations))
    cfg = DataConfig(
        kind="cc_sbu_align",
        train_annotation=str(folder / "filter_cap.json"),
        image_size=16,
        batch_size=3,
        num_workers=0,
    )
    batch = next(iter(build_train_loader(cfg, 0, 1, seed=0)))
    assert sorted(batch["image_id"]) == ["2", "5", "9"]
    assert all(text.startswith("the image shows thing ") for text in batch["text_input"])


def test_vqav2_official_and_lavis_formats(tmp_path):
    write_images(tmp_path, ["val2014/COCO_val2014_000000262148.jpg"])
    questions = {
        "questions": [
            {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
            {"image_id": 999, "question": "Is this missing?", "question_id": 999000},
        ]
    }
    answers = {
        "annotations": [
            {
                "question_id": 262148000,
                "answer_type": "other",
                "answers": [{"answer": "down"}, {"answer": "at table"}],
            },
            {"question_id": 999000, "answers": [{"answer": "yes"}]},
        ]
    }
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "annotations.json").write_text(json.dumps(answers))
    records = load_vqa_records(tmp_path / "questions.json", tmp_path / "annotations.json")
    dataset = VQADataset(records, ImagePathResolver(tmp_path), ImageEvalProcessor(16))
    assert len(dataset) == 1 and dataset.skipped == {"missing_image": 1}
    item = dataset[0]
    assert item["text_input"] == "where is he looking?" and item["question_id"] == 262148000
    assert item["answers"] == ["down", "at table"] and item["image"].shape == (3, 16, 16)
    assert dataset.records[0].answer_type == "other"
    lavis = [
        {
            "question_id": 1,
            "question": "What (color)?",
            "image": "val2014/COCO_val2014_000000262148.jpg",
            "answer": ["red"] * 10,
        }
    ]
    (tmp_path / "vqa_val_eval.json").write_text(json.dumps(lavis))
    cfg = DataConfig(
        vqa_questions=str(tmp_path / "vqa_val_eval.json"), image_root=str(tmp_path), image_size=16
    )
    dataset = build_eval_dataset(cfg, task="vqa")
    assert dataset[0]["image_id"] == 262148 and dataset[0]["text_input"] == "what color?"


def test_annotations_to_shards_round_trip(coco):
    folder, root = coco
    (root / "train2014/COCO_train2014_000000000002.jpg").write_bytes(b"corrupt")
    records = load_caption_records(folder / "coco_karpathy_train.json")
    shards = annotations_to_shards(
        records, ImagePathResolver(root), folder / "shards", samples_per_shard=4, progress=False
    )
    assert [path.name for path in shards] == ["00000.tar", "00001.tar", "00002.tar"]
    totals = read_stats_files(folder / "shards")
    assert (totals["count"], totals["successes"]) == (9, 7)
    assert (totals["failed_to_download"], totals["failed_to_resize"]) == (1, 1)
    pattern = str(folder / "shards/{00000..00002}.tar")
    cfg = DataConfig(kind="wds", train_shards=[pattern], image_size=16, batch_size=7, num_workers=0)
    batch = next(iter(build_train_loader(cfg, 0, 1, seed=0)))
    assert sorted(batch["image_id"]) == sorted(f"coco_{i}" for i in (1, 3, 4, 5, 6, 7, 8))
