"""Instruction-tuning data (InstructBLIP): per-source tasks, sqrt mixing, VQA shards, templates."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from data_helpers import jpeg_bytes, load_tool, sample_members, write_id_shards, write_tar

from blip2_megatron.config import ConfigError, from_dict
from blip2_megatron.config.model import build_model_config
from blip2_megatron.data import DataConfig, build_train_loader, ensure_sample_dataset, load_vqa_records
from blip2_megatron.data.batch import build_batch_builder
from blip2_megatron.data.loader import (
    build_train_sources,
    draw_instruction,
    load_instruction_templates,
    prepare_data,
    source_weights,
)
from blip2_megatron.data.processors import QuestionProcessor
from blip2_megatron.data.sample_dataset import HELD_OUT, ShapeScene
from blip2_megatron.data.wds import (
    ShardWriter,
    count_samples,
    expand_shard_patterns,
    iter_shard_samples,
    read_stats_files,
    vqa_target,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = {"num_train": 60, "num_val": 40, "num_test": 12, "num_shards": 3}
TEMPLATES = load_instruction_templates("instruct_templates", ["caption", "vqa", "conversation"])


def shard_samples(pattern: str) -> list[dict]:
    """Every raw sample of a shard pattern, json decoded."""
    samples = []
    for url in expand_shard_patterns(pattern):
        for raw in iter_shard_samples(url, on_error=lambda exn: False):
            samples.append({**raw, "json": json.loads(raw["json"])})
    return samples


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    return ensure_sample_dataset(tmp_path_factory.mktemp("instruct") / "shapes", seed=0, **SMALL)


def instruct_config(**overrides) -> DataConfig:
    settings = {
        "image_size": 16,
        "batch_size": 4,
        "num_workers": 0,
        "instruction_templates": "instruct_templates",
    }
    settings.update(overrides)
    return DataConfig(**settings)


# ----------------------------------------------------------------------------- sqrt mixing


def test_sqrt_weights_come_from_the_counted_sizes_and_set_the_mix(tmp_path, caplog):
    listed = write_id_shards(
        tmp_path / "listed", 2, 50, prefix="big", image_size=8
    )  # counted by listing: 100
    with ShardWriter(tmp_path / "stats", samples_per_shard=30) as writer:
        for index in range(25):
            writer.write(jpeg_bytes(8, 8), "small photo", meta={"image_id": f"small-{index}"})
    stats_pattern = str(tmp_path / "stats" / "00000.tar")
    cfg = DataConfig(
        kind="wds",
        train_shards=[listed, stats_pattern],
        mix_weights="sqrt",
        image_size=8,
        batch_size=50,
        num_workers=0,
        resampled=True,
        samples_per_epoch=1500,
    )
    sources = build_train_sources(cfg)
    with caplog.at_level(logging.INFO, logger="blip2_megatron.data.loader"):
        assert source_weights(cfg, sources) == [10.0, 5.0]
    assert "100 samples -> weight 10.0 (66.7%)" in caplog.text and "25 samples -> weight 5.0" in caplog.text
    # The counts are the loader's own (samples_per_epoch's): the stats file wins over the tar.
    stats_file = tmp_path / "stats" / "00000_stats.json"
    stats_file.write_text(json.dumps({**json.loads(stats_file.read_text()), "successes": 36}))
    assert source_weights(cfg, build_train_sources(cfg)) == [10.0, 6.0]

    ids = [image_id for batch in build_train_loader(cfg, 0, 1, seed=3) for image_id in batch["image_id"]]
    fraction = sum(image_id.startswith("big") for image_id in ids) / len(ids)
    # sqrt weights 10 : 6 -> 0.625 (by size it would be 0.735); Binomial(1500) 3 sigma is 0.037.
    assert len(ids) == 1500 and abs(fraction - 0.625) < 0.037


def test_sqrt_mix_weights_from_yaml_and_bad_values():
    cfg = from_dict(DataConfig, {"kind": "wds", "train_shards": ["a.tar", "b.tar"], "mix_weights": "sqrt"})
    assert cfg.mix_weights == "sqrt"
    assert from_dict(
        DataConfig, {"kind": "wds", "train_shards": ["a.tar"], "mix_weights": [2]}
    ).mix_weights == [2.0]
    with pytest.raises(ConfigError, match="mix_weights='cube'.*'sqrt'"):
        DataConfig(kind="wds", train_shards=["a.tar"], mix_weights="cube")


# ----------------------------------------------------------------------------- VQA samples


def test_vqa_target_is_the_most_frequent_answer():
    assert vqa_target(["no", "yes", "yes", "maybe", "yes"]) == "yes"
    assert vqa_target(["no", "yes", "yes", "no"]) == "no"  # a tie: the first seen
    assert vqa_target(["two", "2", "2"], weights=[3.0, 1.0, 1.0]) == "two"  # weights vote
    with pytest.raises(ValueError):
        vqa_target([])


def write_vqa_shard(path: Path) -> str:
    image = jpeg_bytes(20, 16)
    members = []
    members += sample_members(
        "00000",
        image,
        "ignored",
        {
            "image_id": 1,
            "question": "What COLOUR is the cat?",
            "answers": ["black", "white", "white", "grey"],
        },
    )
    members += sample_members(
        "00001",
        image,
        None,
        {
            "image_id": 2,
            "question": "How many?",
            "answers": [{"answer": "3"}, {"answer": "three"}, {"answer": "3"}],
        },
    )
    members += sample_members(
        "00002",
        image,
        None,
        {
            "image_id": 3,
            "question": "Is it day?",
            "answers": ["no", "yes", "yes"],
            "answer_weights": [3, 1, 1],
        },
    )
    members += sample_members("00003", image, "a caption, not a question", {"image_id": 4})
    write_tar(path, members)
    return str(path)


def test_a_vqa_shard_trains_on_its_most_frequent_answer(tmp_path):
    shard = write_vqa_shard(tmp_path / "00000.tar")
    cfg = instruct_config(kind="wds", train_shards=[shard], source_tasks=["vqa"], batch_size=3)
    loader = build_train_loader(cfg, 0, 1, seed=0)
    (batch,) = list(loader)
    targets = dict(zip(batch["image_id"], batch["text_output"]))
    assert targets == {1: "white", 2: "3", 3: "no"}
    assert batch["task"] == ["vqa"] * 3
    questions = {1: "what colour is the cat?", 2: "how many?", 3: "is it day?"}  # LAVIS question processing
    for image_id, prompt, key in zip(batch["image_id"], batch["prompt"], batch["sample_key"]):
        assert prompt == draw_instruction(TEMPLATES["vqa"], key).replace("{}", questions[image_id])
    assert batch["text_input"] == [f"{p} {t}" for p, t in zip(batch["prompt"], batch["text_output"])]
    assert loader.stats == {"missing_question": 1}  # the caption-only sample is no VQA sample


# ----------------------------------------------------------------------------- templates


def prompts_by_key(batches) -> dict[str, str]:
    return {key: prompt for batch in batches for key, prompt in zip(batch["sample_key"], batch["prompt"])}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_templates_are_drawn_per_sample_the_same_way_by_every_loader_and_after_resume(tmp_path, num_workers):
    pattern = write_id_shards(tmp_path, 4, 12, image_size=8)
    cfg = instruct_config(kind="wds", train_shards=pattern, num_workers=num_workers, shuffle_buffer=8)
    first = list(build_train_loader(cfg, 0, 1, seed=5))
    second = list(build_train_loader(cfg, 0, 1, seed=5))
    assert [b["prompt"] for b in first] == [b["prompt"] for b in second]
    drawn = prompts_by_key(first)
    assert set(drawn.values()) <= set(TEMPLATES["caption"]) and len(set(drawn.values())) >= 4
    assert all(prompt == draw_instruction(TEMPLATES["caption"], key) for key, prompt in drawn.items())
    for batch in first:
        assert batch["task"] == ["caption"] * 4
        assert batch["text_output"] == [
            text.removeprefix(p + " ") for p, text in zip(batch["prompt"], batch["text_input"])
        ]

    stopped = build_train_loader(cfg, 0, 1, seed=5)
    batches = iter(stopped)
    for _ in range(5):
        next(batches)
    resumed = build_train_loader(cfg, 0, 1, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    rest = list(resumed)
    assert [(b["sample_key"], b["prompt"], b["image_id"]) for b in rest] == [
        (b["sample_key"], b["prompt"], b["image_id"]) for b in first[5:]
    ]


def test_without_templates_batches_are_unchanged(tmp_path):
    pattern = write_id_shards(tmp_path, 2, 8, image_size=8)
    plain = DataConfig(kind="wds", train_shards=pattern, image_size=8, batch_size=4, num_workers=0)
    tasked = plain.replace(source_tasks=["caption"])
    for ours, reference in zip(
        build_train_loader(tasked, 0, 1, 0), build_train_loader(plain, 0, 1, 0), strict=True
    ):
        assert ours.keys() == reference.keys() == {"image", "text_input", "image_id", "sample_key"}
        assert torch.equal(ours.pop("image"), reference.pop("image")) and ours == reference


# ----------------------------------------------------------------------------- the built-in data


def test_sample_dataset_vqa_and_conversation_training_shards(small_sample):
    vqa = shard_samples(small_sample.vqa_train_shards)
    train = shard_samples(small_sample.train_shards)
    assert len(vqa) == 15 == count_samples(expand_shard_patterns(small_sample.vqa_train_shards))
    images = [raw["jpg"] for raw in train]
    for index, raw in enumerate(vqa):
        meta = raw["json"]
        scene = ShapeScene(meta["shape"], meta["colour"], meta["size"], meta["position"])
        assert (scene.shape, scene.colour) not in HELD_OUT
        assert raw["jpg"] == images[4 * index]  # every fourth train image, its own bytes
        assert len(meta["answers"]) == 10 and raw["txt"].decode() == vqa_target(meta["answers"])
        truth = {question: answer for question, answer, _ in scene.questions(_AnyRng())}
        asked = meta["question"]
        if asked in truth:  # colour / shape / count questions: the target is the scene's answer
            assert raw["txt"].decode() == truth[asked]
    assert any(raw["json"]["answers"][0] != raw["txt"].decode() for raw in vqa)  # not simply the first
    conversation = shard_samples(small_sample.conversation_shards)
    captions = json.loads(small_sample.cc_sbu_align_annotation.read_text())["annotations"]
    assert [raw["txt"].decode() for raw in conversation] == [entry["caption"] for entry in captions]


class _AnyRng:
    """A stand-in generator for ShapeScene.questions: always asks about the first position."""

    def integers(self, high):
        return 0


def test_caption_and_vqa_sources_of_the_sample_dataset_mix_by_sqrt_size(small_sample):
    cfg = instruct_config(
        kind="sample",
        sample_root=str(small_sample.root),
        source_tasks=["caption", "vqa"],
        mix_weights="sqrt",
        batch_size=40,
        resampled=True,
        samples_per_epoch=1200,
    )
    assert prepare_data(cfg).train_shards == [small_sample.train_shards, small_sample.vqa_train_shards]
    vqa = {raw["json"]["image_id"]: raw["json"] for raw in shard_samples(small_sample.vqa_train_shards)}
    captions = {raw["json"]["image_id"]: raw["json"] for raw in shard_samples(small_sample.train_shards)}
    builder = build_batch_builder(build_model_config("tiny"))
    tasks: Counter[str] = Counter()
    for batch in build_train_loader(cfg, 0, 1, seed=0):
        assert len(batch["prompt"]) == len(batch["text_output"]) == 40
        rows = zip(
            batch["task"], batch["image_id"], batch["prompt"], batch["text_output"], batch["sample_key"]
        )
        for task, image_id, prompt, target, key in rows:
            tasks[task] += 1
            if task == "vqa":
                meta = vqa[image_id]
                question = QuestionProcessor()(meta["question"])
                assert prompt == draw_instruction(TEMPLATES["vqa"], key).replace("{}", question)
                assert target == Counter(meta["answers"]).most_common(1)[0][0]
            else:
                meta = captions[image_id]
                scene = ShapeScene(meta["shape"], meta["colour"], meta["size"], meta["position"])
                assert prompt in TEMPLATES["caption"] and target in scene.captions()
        tensors = builder(batch)  # the per-sample prompts are what the batch builder reads
        assert tensors["input_ids"].shape[0] == 40 and (tensors["labels"] != -100).any()
    # sqrt(60) : sqrt(15) = 2 : 1 -> a third VQA (by size it would be a fifth); 3 sigma is 0.041.
    assert sum(tasks.values()) == 1200 and abs(tasks["vqa"] / 1200 - 1 / 3) < 0.041


def test_conversation_targets_keep_their_case_and_punctuation(small_sample):
    cfg = instruct_config(kind="sample", sample_root=str(small_sample.root), source_tasks=["conversation"])
    batch = next(iter(build_train_loader(cfg, 0, 1, seed=0)))
    assert all(prompt in TEMPLATES["conversation"] for prompt in batch["prompt"])
    assert all(target[0].isupper() and target.endswith(".") for target in batch["text_output"])


# ----------------------------------------------------------------------------- bad configs


def test_bad_instruction_configs_are_clear_errors(tmp_path):
    shards = ["a.tar", "b.tar"]
    with pytest.raises(ConfigError, match=r"source_tasks\[1\]='ocr' is not allowed"):
        DataConfig(kind="wds", train_shards=shards, source_tasks=["caption", "ocr"])
    with pytest.raises(ConfigError, match="source_tasks has 1 entries but data.train_shards has 2"):
        DataConfig(kind="wds", train_shards=shards, source_tasks=["caption"])
    with pytest.raises(ConfigError, match="reads one source"):
        DataConfig(kind="coco", train_annotation="x.json", source_tasks=["caption", "conversation"])
    with pytest.raises(ConfigError, match="needs VQA shards.*vqa_to_wds.py"):
        DataConfig(kind="coco", train_annotation="x.json", source_tasks=["vqa"], instruction_templates="x")
    with pytest.raises(ConfigError, match=r"source_tasks must name one task per source"):
        DataConfig(kind="wds", train_shards=shards, source_tasks=[])
    with pytest.raises(ConfigError, match=r"\['vqa'\] source\(s\).*set data.instruction_templates"):
        DataConfig(kind="wds", train_shards=shards, source_tasks=["caption", "vqa"])
    with pytest.raises(ConfigError, match="leave data.prompt empty"):
        DataConfig(
            kind="wds", train_shards=shards, instruction_templates="instruct_templates", prompt="a photo of "
        )
    with pytest.raises(ConfigError, match="mix_weights has 3 entries but data.source_tasks names 2"):
        instruct_config(kind="sample", source_tasks=["caption", "vqa"], mix_weights=[1, 2, 3])

    shard = write_vqa_shard(tmp_path / "00000.tar")
    cfg = instruct_config(kind="wds", train_shards=[shard], source_tasks=["vqa"])
    with pytest.raises(ConfigError, match="neither a file nor a shipped template file.*instruct_templates"):
        build_train_loader(cfg.replace(instruction_templates=str(tmp_path / "missing.json")), 0, 1, 0)
    bad_files = {
        "captions_only.json": ({"caption": ["Describe it."]}, "has no 'vqa' templates"),
        "no_slot.json": ({"vqa": ["Answer the question."]}, r"holds the question at \{\} exactly once"),
        "typo.json": ({"vqa": ["Q: {} A:"], "vqq": ["x"]}, r"unknown task\(s\) \['vqq'\]"),
        "empty.json": ({"vqa": []}, "non-empty list"),
        "list.json": (["Q: {} A:"], r"must hold \{task: \[templates\]\}"),
    }
    for name, (content, message) in bad_files.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(ConfigError, match=message):
            build_train_loader(cfg.replace(instruction_templates=str(tmp_path / name)), 0, 1, 0)


def test_shipped_templates_cover_every_task_with_several_wordings():
    assert set(TEMPLATES) == {"caption", "vqa", "conversation"}
    assert all(len(entries) >= 4 and len(set(entries)) == len(entries) for entries in TEMPLATES.values())


# ----------------------------------------------------------------------------- vqa_to_wds


def test_vqa_to_wds_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_tool("vqa_to_wds").main(["--help"])
    assert exit_info.value.code == 0 and "usage:" in capsys.readouterr().out


def test_vqa_to_wds_converts_vqav2_files_into_shards_the_loader_reads(small_sample, tmp_path):
    out = tmp_path / "vqa_wds"
    command = [
        sys.executable,
        str(REPO / "data_tools" / "vqa_to_wds.py"),
        "--questions", str(small_sample.vqa_questions),
        "--annotations", str(small_sample.vqa_annotations),
        "--image-root", str(small_sample.image_root),
        "--image-template", small_sample.vqa_image_template,
        "--output", str(out),
        "--samples-per-shard", "64",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    records = load_vqa_records(small_sample.vqa_questions, small_sample.vqa_annotations)
    assert f"of {len(records)} question(s)" in done.stdout and len(records) == 160
    assert read_stats_files(out)["successes"] == 160 and sorted(p.name for p in out.glob("*.tar")) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    answers = {record.question_id: record.answers[0] for record in records}
    cfg = instruct_config(
        kind="wds", train_shards=str(out / "{00000..00002}.tar"), source_tasks=["vqa"], batch_size=16
    )
    loader = build_train_loader(cfg, 0, 1, seed=0)
    assert len(loader) == 10
    by_image: dict[int, set[str]] = {}
    for record in records:
        by_image.setdefault(record.image_id, set()).add(answers[record.question_id])
    for batch in loader:
        assert batch["image"].shape == (16, 3, 16, 16) and batch["task"] == ["vqa"] * 16
        assert all(
            target in by_image[image_id] for image_id, target in zip(batch["image_id"], batch["text_output"])
        )
    assert loader.stats == {}
