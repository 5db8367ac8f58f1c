"""data_tools scripts and the built-in sample dataset."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from data_helpers import jpeg_bytes, load_tool, sample_members, write_id_shards, write_tar
from pycocotools.coco import COCO

from blip2_megatron.data import (
    DataConfig,
    build_eval_dataset,
    build_train_loader,
    caption_ground_truth,
    ensure_sample_dataset,
    load_caption_records,
)
from blip2_megatron.data import sample_dataset as sample_module
from blip2_megatron.data.sample_dataset import HELD_OUT, ShapeScene
from blip2_megatron.data.wds import count_samples, expand_shard_patterns, iter_shard_samples, read_stats_files

TOOLS = ["download", "coco_to_wds", "vg_to_wds", "check_shards", "make_sample_dataset", "bench_loader"]
SMALL = {"num_train": 60, "num_val": 40, "num_test": 12, "num_shards": 3}


@pytest.mark.parametrize("name", TOOLS)
def test_every_tool_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool(name).main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- sample dataset


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def test_sample_dataset_is_deterministic_and_idempotent(tmp_path):
    first = ensure_sample_dataset(tmp_path / "a", seed=3, **SMALL)
    second = ensure_sample_dataset(tmp_path / "b", seed=3, **SMALL)
    files_a, files_b = tree_bytes(first.root), tree_bytes(second.root)
    # Everything but the stats files' timestamps is byte-identical.
    assert files_a.keys() == files_b.keys()
    assert all(files_a[name] == files_b[name] for name in files_a if not name.endswith("_stats.json"))
    other = ensure_sample_dataset(tmp_path / "c", seed=4, **SMALL)
    assert (other.root / "train/00000.tar").read_bytes() != files_a["train/00000.tar"]

    stamp = (first.root / "manifest.json").stat().st_mtime_ns
    assert ensure_sample_dataset(tmp_path / "a", seed=3, **SMALL) == first
    assert (first.root / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="num_train"):
        ensure_sample_dataset(tmp_path / "a", seed=3, **{**SMALL, "num_train": 61})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging leftovers


def test_sample_dataset_content_captions_held_out_and_coco_gt(tmp_path):
    paths = ensure_sample_dataset(tmp_path / "shapes", seed=0, **SMALL)
    urls = expand_shard_patterns(paths.train_shards)
    assert (
        len(urls) == 3
        and count_samples(urls) == 60
        and read_stats_files(paths.root / "train")["successes"] == 60
    )
    for url in urls:
        for raw in iter_shard_samples(url, on_error=lambda exn: False):
            meta = json.loads(raw["json"])
            scene = ShapeScene(meta["shape"], meta["colour"], meta["size"], meta["position"])
            assert (scene.shape, scene.colour) not in HELD_OUT
            assert raw["txt"].decode() in scene.captions()  # the caption is a function of the content
    val = json.loads(paths.val_annotation.read_text())
    assert any(entry["held_out"] for entry in val) and not all(entry["held_out"] for entry in val)
    assert all(len(entry["caption"]) == len(sample_module.TEMPLATES) for entry in val)
    ground_truth = COCO(str(paths.val_gt))
    assert sorted(ground_truth.getImgIds()) == sorted(
        record.image_id for record in load_caption_records(paths.val_annotation)
    )
    assert len(ground_truth.getAnnIds()) == 40 * len(sample_module.TEMPLATES)
    assert "a orange" not in paths.val_gt.read_text()  # articles agree with the colour


def test_sample_kind_config_trains_and_evaluates(tmp_path):
    paths = ensure_sample_dataset(tmp_path / "shapes", seed=0, **SMALL)
    cfg = DataConfig(kind="sample", sample_root=str(paths.root), image_size=32, batch_size=10, num_workers=0)
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    batches = list(loader)
    assert len(batches) == 6 and batches[0]["image"].shape == (10, 3, 32, 32)
    assert all(
        isinstance(image_id, str) and image_id.startswith("train_") for image_id in batches[0]["image_id"]
    )
    dataset = build_eval_dataset(cfg, "test")
    assert len(dataset) == 12 and dataset[0]["image"].shape == (3, 32, 32)
    assert caption_ground_truth(cfg, "test") == str(paths.test_gt)


def _build_in_child(root: str) -> str:
    return str(ensure_sample_dataset(root, seed=0, **SMALL).root)


def test_concurrent_builders_and_crashes_leave_one_whole_dataset(tmp_path, monkeypatch):
    root = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_build_in_child, [str(root)] * 2) == [str(root)] * 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shared"]

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(sample_module, "_write_eval_split", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_sample_dataset(tmp_path / "crashed", seed=0, **SMALL)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["shared"]


def test_make_sample_dataset_defaults(tmp_path, capsys):
    started = time.perf_counter()
    assert load_tool("make_sample_dataset").main(["--root", str(tmp_path / "default")]) == 0
    out = capsys.readouterr().out
    print(f"default sample dataset written in {time.perf_counter() - started:.1f} s")  # ~10 s on 2 cores
    assert "train_shards" in out
    assert count_samples(expand_shard_patterns(str(tmp_path / "default/train/{00000..00007}.tar"))) == 4000


# ----------------------------------------------------------------------------- converters


def test_coco_and_vg_converters(tmp_path, capsys):
    root = tmp_path / "images"
    for relative in ("val2014/a.jpg", "VG_100K_2/7.jpg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(jpeg_bytes(30, 20))
    coco = [
        {"image": "val2014/a.jpg", "caption": "a thing", "image_id": "coco_1"},
        {"image": "val2014/gone.jpg", "caption": "a missing thing", "image_id": "coco_2"},
    ]
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    argv = [
        "--annotation",
        str(tmp_path / "coco.json"),
        "--image-root",
        str(root),
        "--output",
        str(tmp_path / "coco"),
    ]
    assert load_tool("coco_to_wds").main(argv) == 0
    output = capsys.readouterr().out
    assert "successes: 1" in output and "failed_to_download: 1" in output and "image file not found" in output
    stats = json.loads((tmp_path / "coco/00000_stats.json").read_text())
    assert (stats["count"], stats["successes"], stats["failed_to_download"]) == (2, 1, 1)

    vg = [{"image": "VG_100K/7.jpg", "caption": "a tree", "image_id": 7}]
    (tmp_path / "vg.json").write_text(json.dumps(vg))
    argv[1], argv[-1] = str(tmp_path / "vg.json"), str(tmp_path / "vg")
    assert load_tool("vg_to_wds").main(argv) == 0
    assert "successes: 1" in capsys.readouterr().out
    (raw,) = iter_shard_samples(str(tmp_path / "vg/00000.tar"), on_error=lambda exn: False)
    assert json.loads(raw["json"])["image_id"] == 7 and raw["txt"] == b"a tree"


def test_check_shards_reports_bad_samples_and_broken_shards(tmp_path, capsys):
    write_id_shards(tmp_path, 1, 3)
    members = sample_members("k-bad", b"not a jpeg", "caption") + sample_members("k-good", jpeg_bytes(), "ok")
    write_tar(tmp_path / "00001.tar", members)
    whole = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00002.tar").write_bytes(whole[: len(whole) // 2 + 100])  # cut short
    check = load_tool("check_shards")
    assert check.main([str(tmp_path / "{00000..00001}.tar")]) == 0
    output = capsys.readouterr().out
    assert "k-bad  undecodable_image" in output and "total" in output
    assert check.main([str(tmp_path / "{00000..00002}.tar"), "--processes", "2"]) == 1
    assert "truncated" in capsys.readouterr().out


def test_download_converts_minigpt4_json_to_parquet(tmp_path):
    download = load_tool("download")
    records = [{"url": "http://x/1.jpg", "caption": "one"}, {"url": "http://x/2.jpg", "caption": "two"}]
    (tmp_path / "ccs_synthetic_filtered_large.json").write_text(json.dumps(records))
    parquet = download.json_to_parquet(
        tmp_path / "ccs_synthetic_filtered_large.json", tmp_path / "urls.parquet", "url", "caption"
    )
    import pandas as pd

    assert pd.read_parquet(parquet).to_dict("records") == records
    with pytest.raises(SystemExit, match="'text'"):
        download.json_to_parquet(
            tmp_path / "ccs_synthetic_filtered_large.json", tmp_path / "u.parquet", "url", "text"
        )


def test_bench_loader_runs_and_prints_the_table(capsys):
    argv = ["--sizes", "32", "--workers", "0", "--images", "96x64", "--num-images", "32", "--repeats", "1"]
    assert load_tool("bench_loader").main(argv) == 0
    output = capsys.readouterr().out
    assert "ratio" in output and "96x64" in output


def test_bench_loader_compares_a_tp_ranks_share_with_the_whole_batch(capsys):
    argv = ["--tp", "2", "--sizes", "32", "--workers", "0", "--images", "96x64", "--num-images", "32"]
    assert load_tool("bench_loader").main([*argv, "--batch-size", "8", "--repeats", "1"]) == 0
    output = capsys.readouterr().out
    row = next(line for line in output.splitlines() if line.startswith("96x64"))
    whole, shared = (float(value) for value in row.split()[-3:-1])
    assert whole > 0 and shared > 0 and "decoding its 4" in output
