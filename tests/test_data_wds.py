"""Streaming train loader on tiny tar shards written by the tests: splitting, mixing, resume, skips."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch
from data_helpers import jpeg_bytes, sample_members, truncated_jpeg, write_id_shards, write_tar

from blip2_megatron.config import ConfigError, from_dict
from blip2_megatron.data import DataConfig, ImageEvalProcessor, ImageTrainProcessor, build_train_loader
from blip2_megatron.data.batch import image_rows
from blip2_megatron.data.processors import ImageDecodeError
from blip2_megatron.data.wds import (
    ShardWriter,
    count_shard_samples,
    expand_shard_patterns,
    open_shard,
    read_stats_files,
)


def wds_config(shards, **overrides) -> DataConfig:
    """A small, fast config: 16 px images, no sample shuffle unless asked."""
    settings = {"kind": "wds", "train_shards": shards, "image_size": 16, "batch_size": 4, "num_workers": 0}
    settings.update(overrides)
    return DataConfig(**settings)


def epoch_ids(loader) -> list[list]:
    """image_id lists of the batches of one epoch."""
    return [batch["image_id"] for batch in loader]


# ----------------------------------------------------------------------------- shard lists


def test_expand_patterns_and_missing_shards(tmp_path):
    urls = expand_shard_patterns("/d/{00000..00002}.tar::/e/x.tar")
    assert urls == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar", "/e/x.tar"]
    assert expand_shard_patterns(["/a/{0..1}.tar", "/b.tar"]) == ["/a/0.tar", "/a/1.tar", "/b.tar"]
    pattern = write_id_shards(tmp_path, 2, 4)
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        build_train_loader(wds_config(pattern.replace("00001", "00002")), 0, 1, seed=0)
    with pytest.raises(FileNotFoundError, match="gone.tar"):
        open_shard(str(tmp_path / "gone.tar"))


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="data.kind"):
        DataConfig(kind="laion")
    with pytest.raises(ConfigError, match="data.mix_weights"):
        DataConfig(kind="wds", train_shards=["a.tar", "b.tar"], mix_weights=[1.0])
    with pytest.raises(ConfigError, match="data.train_shards"):
        DataConfig(kind="wds")
    with pytest.raises(ConfigError, match="data.min_crop_scale"):
        DataConfig(min_crop_scale=0.0)
    with pytest.raises(ConfigError, match="data.train_annotation"):
        DataConfig(kind="coco")
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(DataConfig, {"batchsize": 3}, prefix="data")
    cfg = from_dict(
        DataConfig, {"kind": "wds", "train_shards": "x/{0..3}.tar", "batch_size": "16"}, prefix="data"
    )
    assert cfg.train_shards == ["x/{0..3}.tar"] and cfg.batch_size == 16 and cfg.train_augment is True
    assert DataConfig().train_augment is False  # the sample set's captions name left / right


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dp_ranks_see_disjoint_samples_covering_the_epoch(tmp_path, num_workers):
    pattern = write_id_shards(tmp_path, 8, 12)
    cfg = wds_config(pattern, batch_size=6, num_workers=num_workers, shuffle_buffer=20)
    per_rank = []
    for rank in range(2):
        loader = build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=3)
        batches = epoch_ids(loader)
        assert len(batches) == loader.batches_per_epoch == 8
        assert all(len(batch) == 6 for batch in batches)
        per_rank.append([sample for batch in batches for sample in batch])
    assert not set(per_rank[0]) & set(per_rank[1])
    everything = {f"s{shard}-{index}" for shard in range(8) for index in range(12)}
    assert set(per_rank[0]) | set(per_rank[1]) == everything
    assert len(per_rank[0]) == len(set(per_rank[0]))


def test_tp_ranks_of_one_dp_rank_get_identical_batches_whatever_the_environment(tmp_path, monkeypatch):
    pattern = write_id_shards(tmp_path, 4, 8)
    cfg = wds_config(pattern, train_augment=True, shuffle_buffer=10)
    first = list(build_train_loader(cfg, dp_rank=1, dp_size=2, seed=5))
    # Another TP rank of the same DP rank: different global rank in the environment.
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    second = list(build_train_loader(cfg, dp_rank=1, dp_size=2, seed=5))
    assert [b["image_id"] for b in first] == [b["image_id"] for b in second]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))


def test_uneven_shards_still_give_every_rank_the_same_batch_count(tmp_path):
    pattern = write_id_shards(tmp_path, 4, [30, 2, 30, 2])
    cfg = wds_config(pattern)
    counts = [len(epoch_ids(build_train_loader(cfg, rank, 2, seed=0))) for rank in range(2)]
    assert counts == [8, 8]  # 64 samples // (2 ranks * 4): the short rank repeats its data


def test_too_few_shards_is_an_error_unless_resampled(tmp_path):
    pattern = write_id_shards(tmp_path, 3, 8)
    with pytest.raises(ValueError, match="resampled"):
        build_train_loader(wds_config(pattern, num_workers=2), 0, 2, seed=0)
    loader = build_train_loader(wds_config(pattern, resampled=True), 0, 4, seed=0)
    assert len(epoch_ids(loader)) == loader.batches_per_epoch == 1


def test_mixing_ratio_holds(tmp_path):
    laion = write_id_shards(tmp_path / "laion", 2, 40, prefix="laion", image_size=8)
    ccsbu = write_id_shards(tmp_path / "ccsbu", 2, 40, prefix="cc", image_size=8)
    cfg = wds_config(
        [laion, ccsbu],
        mix_weights=[3.0, 1.0],
        resampled=True,
        samples_per_epoch=2000,
        batch_size=50,
        image_size=8,
    )
    ids = [sample for batch in build_train_loader(cfg, 0, 1, seed=1) for sample in batch["image_id"]]
    fraction = sum(sample.startswith("laion") for sample in ids) / len(ids)
    # Binomial(2000, 0.75): 3 sigma is 0.029.
    assert len(ids) == 2000 and abs(fraction - 0.75) < 0.03


# ----------------------------------------------------------------------------- resume


def run_steps(loader, steps: int) -> list[tuple[list, torch.Tensor]]:
    """(image_ids, images) of the next ``steps`` batches, crossing epochs."""
    out = []
    batches = loader.endless()
    for _ in range(steps):
        batch = next(batches)
        out.append((batch["image_id"], batch["image"]))
    return out


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_exactly_where_it_stopped(tmp_path, num_workers):
    pattern = write_id_shards(tmp_path, 4, 9)
    cfg = wds_config(pattern, num_workers=num_workers, train_augment=True, shuffle_buffer=8)
    reference = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
    assert reference.batches_per_epoch == 4
    uninterrupted = run_steps(reference, 10)  # 2.5 epochs
    for stop in (3, 4, 7):  # mid-epoch with an odd position, at an epoch boundary, in epoch 2
        first = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
        run_steps(first, stop)
        state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
        resumed = build_train_loader(cfg, dp_rank=1, dp_size=2, seed=11)
        resumed.load_state_dict(state)
        rest = run_steps(resumed, 10 - stop)
        for (ids, images), (expected_ids, expected_images) in zip(rest, uninterrupted[stop:]):
            assert ids == expected_ids
            assert torch.equal(images, expected_images)
    other_seed = run_steps(build_train_loader(cfg, dp_rank=1, dp_size=2, seed=12), 4)
    assert [ids for ids, _ in other_seed] != [ids for ids, _ in uninterrupted[:4]]


def test_epochs_reshuffle_and_state_counts(tmp_path):
    pattern = write_id_shards(tmp_path, 4, 8)
    loader = build_train_loader(wds_config(pattern, shuffle_buffer=8), 0, 1, seed=0)
    first, second = epoch_ids(loader), epoch_ids(loader)
    assert first != second and sorted(sum(first, [])) == sorted(sum(second, []))
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["position"] == 0


# ----------------------------------------------------------------------------- bad samples


def bad_shard_members():
    good = jpeg_bytes(20, 16)
    members = []
    members += sample_members("bad-truncated", truncated_jpeg(), "a caption")
    members += sample_members("bad-nocaption", good, None)
    members += sample_members("bad-noimage", None, "a caption")
    members += [("bad-json.jpg", good), ("bad-json.json", b"{not json")]
    members += sample_members("bad-garbage", b"not an image at all", "a caption")
    for index in range(8):
        members += sample_members(f"good-a{index}", good, f"good a{index}", {"image_id": f"a{index}"})
    return members


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path, num_workers):
    write_tar(tmp_path / "00000.tar", bad_shard_members())
    write_id_shards(tmp_path / "b", 1, 8, prefix="b")
    (tmp_path / "b" / "00000.tar").rename(tmp_path / "00001.tar")
    cfg = wds_config(
        str(tmp_path / "{00000..00001}.tar"), num_workers=num_workers, shuffle_buffer=0, samples_per_epoch=16
    )
    loader = build_train_loader(cfg, 0, 1, seed=0)
    started = time.perf_counter()
    ids = [sample for batch in loader for sample in batch["image_id"]]
    elapsed = time.perf_counter() - started
    assert sorted(ids) == sorted([f"a{i}" for i in range(8)] + [f"b0-{i}" for i in range(8)])
    assert loader.stats == {
        "truncated_image": 1,
        "missing_caption": 1,
        "missing_image": 1,
        "bad_json": 1,
        "undecodable_image": 1,
    }
    if num_workers == 0:
        assert elapsed < 2.0  # webdataset's warn_and_continue would sleep 0.5 s per bad sample
    # Counts survive a checkpoint.
    restored = build_train_loader(cfg, 0, 1, seed=0)
    restored.load_state_dict(loader.state_dict())
    assert restored.stats == loader.stats


def _shards_with_bad_samples(tmp_path) -> str:
    write_tar(tmp_path / "00000.tar", bad_shard_members())
    write_id_shards(tmp_path / "b", 1, 8, prefix="b")
    (tmp_path / "b" / "00000.tar").rename(tmp_path / "00001.tar")
    return str(tmp_path / "{00000..00001}.tar")


def _count_full_decodes(monkeypatch) -> list[int]:
    decoded = []
    for processor in (ImageTrainProcessor, ImageEvalProcessor):
        call = processor.__call__

        def counting(self, *args, _call=call, **kwargs):
            image = _call(self, *args, **kwargs)
            decoded.append(1)  # decoded in full (an undecodable image raised above)
            return image

        monkeypatch.setattr(processor, "__call__", counting)
    return decoded


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_sharing_batches_decode_only_their_image_rows(tmp_path, monkeypatch, num_workers):
    """TP ranks of one DP rank: each fully decodes only its rows' images; batches and skips stay equal."""
    cfg = wds_config(
        _shards_with_bad_samples(tmp_path),
        batch_size=3,
        num_workers=num_workers,
        shuffle_buffer=4,
        samples_per_epoch=16,
        train_augment=True,
    )
    decoded = _count_full_decodes(monkeypatch)
    whole = build_train_loader(cfg, 0, 1, seed=4)
    expected = list(whole)
    decodes_whole = len(decoded)
    for rows in (image_rows(3, 0, 2), image_rows(3, 1, 2), []):  # rows [0, 1]; [2, 2]; a later stage
        decoded.clear()
        shared = build_train_loader(cfg, 0, 1, seed=4, image_rows=rows)
        batches = list(shared)
        assert len(batches) == len(expected) == 5
        for batch, reference in zip(batches, expected):
            assert (
                batch["image_id"] == reference["image_id"] and batch["text_input"] == reference["text_input"]
            )
            assert torch.equal(batch["image"], reference["image"][rows] if rows else torch.empty(0))
        assert shared.stats == whole.stats and "truncated_image" in whole.stats
        if num_workers == 0:  # (workers count in their own processes)
            assert decodes_whole == 15 and len(decoded) == 5 * len(set(rows))


def test_image_that_validates_but_fails_to_decode_stops_a_shared_batch(tmp_path, monkeypatch):
    """The ranks that only validate it would keep it: stop with its name rather than split the batches."""
    cfg = wds_config(write_id_shards(tmp_path, 1, 8), batch_size=2, train_augment=True)

    def fails(self, *args, **kwargs):
        raise ImageDecodeError("corrupt_image", "broken in full")

    monkeypatch.setattr(ImageTrainProcessor, "__call__", fails)
    with pytest.raises(RuntimeError, match="passes the 1/8-scale validation.*broken in full"):
        next(iter(build_train_loader(cfg, 0, 1, seed=0, image_rows=[1])))
    batch = next(iter(build_train_loader(cfg, 0, 1, seed=0, image_rows=[])))  # decodes nothing: fine
    assert len(batch["image_id"]) == 2


def test_corrupt_tar_is_counted_not_fatal(tmp_path):
    pattern = write_id_shards(tmp_path, 2, 10)
    data = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 10}))
    loader = build_train_loader(wds_config(pattern), 0, 1, seed=0)
    assert len(epoch_ids(loader)) == 5
    assert loader.stats.get("truncated_shard", 0) >= 1


def test_data_without_any_usable_sample_fails_clearly(tmp_path):
    write_tar(tmp_path / "00000.tar", [(f"{i:04d}.jpg", jpeg_bytes(8, 8)) for i in range(50)])
    loader = build_train_loader(wds_config(str(tmp_path / "00000.tar"), samples_per_epoch=40), 0, 1, seed=0)
    with pytest.raises(RuntimeError, match="unusable"):
        next(iter(loader))


def test_caption_sources_image_ids_and_prompt(tmp_path):
    image = jpeg_bytes(20, 16)
    members = []
    members += sample_members("00000", image, "from txt", {"key": "00000"})
    members += sample_members(
        "00001", image, "ignored txt", {"caption": ["First.", "SECOND", "third"], "image_id": 7}
    )
    write_tar(tmp_path / "00000.tar", members)
    cfg = wds_config(str(tmp_path / "00000.tar"), batch_size=2, prompt="a photo of ")
    seen_second = Counter()
    for seed in range(12):
        batch = next(iter(build_train_loader(cfg, 0, 1, seed=seed)))
        by_id = dict(zip(batch["image_id"], batch["text_output"]))
        assert by_id["00000"] == "from txt"  # no json caption: the .txt; id from json "key"
        assert isinstance(next(key for key in by_id if key != "00000"), int)  # 7 kept as an int
        seen_second[by_id[7]] += 1
        assert batch["text_input"] == ["a photo of " + text for text in batch["text_output"]]
        assert batch["prompt"] == ["a photo of "] * 2
        assert batch["image"].shape == (2, 3, 16, 16)
    assert set(seen_second) == {"first", "second"}  # random among the first two only


# ----------------------------------------------------------------------------- writing


def test_shard_writer_layout_and_sample_counts(tmp_path):
    with ShardWriter(tmp_path, samples_per_shard=5) as writer:
        for index in range(12):
            writer.write(jpeg_bytes(8, 8), f"caption {index}", meta={"image_id": index})
            if index == 2:
                writer.record_failure("image file not found")
                writer.record_failure("image decoding error", unreadable=True)
    assert [path.name for path in writer.shard_paths] == ["00000.tar", "00001.tar", "00002.tar"]
    stats = json.loads((tmp_path / "00000_stats.json").read_text())
    assert stats["count"] == 5 and stats["successes"] == 3
    assert stats["failed_to_download"] == 1 and stats["failed_to_resize"] == 1
    assert stats["status_dict"] == {"success": 3, "image file not found": 1, "image decoding error": 1}
    assert count_shard_samples(str(tmp_path / "00001.tar")) == 5
    (tmp_path / "00001_stats.json").unlink()
    assert count_shard_samples(str(tmp_path / "00001.tar")) == 5  # from the tar listing
    totals = read_stats_files(tmp_path)
    assert totals["successes"] == 7 and totals["count"] == 9 and totals["shards"] == 2
    assert not list(tmp_path.glob("*.partial"))
    loader = build_train_loader(wds_config(str(tmp_path / "{00000..00002}.tar"), batch_size=3), 0, 1, seed=0)
    assert sorted(i for b in loader for i in b["image_id"]) == list(range(12))
