"""The BLIP-2 and MiniGPT-4 recipes end to end, as a user runs them, at tiny size on the built-in data.

BLIP-2 (LAVIS's order): stage 1 -> its retrieval evaluation -> stage 2 initialised from the
stage-1 run (the Q-Former hand-off) -> COCO caption fine-tuning with the ViT trained at a
larger image size -> caption evaluation -> zero-shot VQA evaluation -> predict -> export
to transformers -> transformers generates the same tokens as we do.

MiniGPT-4: stage 1 (only the projection trains; two shard sources mixed) -> stage 2 on
cc_sbu_align annotations from the stage-1 run -> predict with an instruction.

Training runs through the DeepSpeed launcher (``deepspeed launch/train.py``), the other
steps through ``python launch/<tool>.py``, all with the shipped job configs plus the
overrides of :func:`journeys.tiny_overrides`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from journeys import launch, step_records, summary, tiny_overrides, train_job

pytestmark = [pytest.mark.slow, pytest.mark.journey]


def _train(config: str, run: Path, *overrides: str, nproc: int = 1, timeout: int = 900):
    return train_job(config, run, *overrides, nproc=nproc, timeout=timeout)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _falls(run: Path, key: str, window: int = 3) -> tuple[float, float]:
    """(mean of the first, mean of the last ``window`` logged values) of ``key``."""
    logged = [r[key] for _, r in sorted(step_records(run).items())]
    return _mean(logged[:window]), _mean(logged[-window:])


@pytest.fixture(scope="module")
def blip2_runs(tmp_path_factory, sample):
    """Stage 1, then stage 2 from it, then caption fine-tuning from that: three real runs."""
    root = tmp_path_factory.mktemp("blip2_chain")
    runs = {name: root / name for name in ("stage1", "stage2", "caption")}
    _train(
        "tiny_stage1",
        runs["stage1"],
        f"data.sample_root={sample.root}",
        "train.max_steps=400",
        "train.log_interval=20",
        "train.save_interval=200",
        "eval.enabled=false",
    )
    _train(
        "stage2_opt2.7b",
        runs["stage2"],
        *tiny_overrides("stage2_opt2.7b", sample),
        f"model.init_checkpoint={runs['stage1']}",
        "train.max_steps=60",
        "train.log_interval=10",
        "train.warmup_steps=10",
        "train.lr=1e-3",
    )
    _train(
        "caption_coco_opt2.7b",
        runs["caption"],
        *tiny_overrides("caption_coco_opt2.7b", sample),
        f"model.init_checkpoint={runs['stage2']}",
        "train.max_steps=60",
        "train.log_interval=10",
        "train.warmup_steps=10",
        "train.lr=1e-3",
        "eval.split=val",
        "eval.max_samples=12",
    )
    return runs


def test_stage1_trains_its_three_losses(blip2_runs):
    run = blip2_runs["stage1"]
    first = step_records(run)[min(step_records(run))]
    assert {"loss_itc", "loss_itm", "loss_lm"} <= set(first), first
    for key in ("loss", "loss_itc", "loss_lm"):
        start, end = _falls(run, key)
        assert end < start - 0.3, (key, start, end)
    # ITM starts near chance (0.637 for one positive in three pairs) and must not rise.
    start, end = _falls(run, "loss_itm")
    assert end <= start + 0.01, (start, end)


def test_stage1_retrieval_evaluation(blip2_runs):
    run = blip2_runs["stage1"]
    launch("evaluate.py", "--checkpoint", str(run), "eval.max_samples=60")
    metrics = json.loads((run / "eval" / "metrics_retrieval_val.json").read_text())
    assert metrics["num_evaluated"] == 60 and metrics["num_missing_images"] == 0
    # 60 images: a random ranking puts the right one in the top 10 one time in six.
    assert metrics["img_r10"] > 100 * 10 / 60 * 1.5, metrics


def test_stage2_starts_from_the_stage1_qformer(blip2_runs, sample, single_process_group):
    """LAVIS's hand-off: the stage-2 model begins with the stage-1 run's Q-Former and queries."""
    from blip2_megatron.build import build_model
    from blip2_megatron.config import load_job_config
    from blip2_megatron.convert.run_checkpoint import RunWeights, find_checkpoint

    job = load_job_config(
        "stage2_opt2.7b",
        [*tiny_overrides("stage2_opt2.7b", sample), f"model.init_checkpoint={blip2_runs['stage1']}"],
    )
    model = build_model(job.model)
    stage1 = RunWeights(find_checkpoint(blip2_runs["stage1"]) / "weights")
    params = dict(model.named_parameters())
    shared = [n for n in stage1.keys() if n in params]
    assert "query_encoder.query_tokens" in shared
    assert any(n.startswith("query_encoder.qformer.encoder.layer.1.crossattention") for n in shared)
    assert any(n.startswith("query_encoder.visual_encoder.") for n in shared)
    for name in shared:
        torch.testing.assert_close(params[name].detach(), stage1.read(name), rtol=0, atol=0, msg=name)
    # The stage-1 heads and the text FFN have no place in the stage-2 model.
    assert "itm_head.weight" in stage1.keys() and "itm_head.weight" not in params
    start, end = _falls(blip2_runs["stage2"], "loss")
    assert end < start, (start, end)


def test_caption_finetune_trains_the_vit_at_the_larger_size(blip2_runs):
    run = blip2_runs["caption"]
    config = (run / "config.yaml").read_text()
    assert "image_size: 48" in config and "freeze: false" in config
    stats = summary(run)
    assert stats["Bleu_4"] >= 0 and stats["num_evaluated"] == 12  # the job's own caption evaluation ran
    start, end = _falls(run, "loss")
    assert end < start, (start, end)
    from blip2_megatron.convert.run_checkpoint import RunWeights, find_checkpoint

    saved = RunWeights(find_checkpoint(run) / "weights").keys()
    # Trained at 48 px: the position embedding was interpolated from the 32-px stage-2 run and trained.
    assert "query_encoder.visual_encoder.embeddings.position_embedding" in saved


def test_caption_and_zero_shot_vqa_evaluation(blip2_runs):
    run = blip2_runs["caption"]
    launch("evaluate.py", "--checkpoint", str(run), "eval.split=test", "eval.max_samples=10")
    captions = json.loads((run / "eval" / "metrics_caption_test.json").read_text())
    assert captions["num_evaluated"] == 10 and "CIDEr" in captions
    launch(
        "evaluate.py", "--checkpoint", str(run), "eval.task=vqa", "eval.max_samples=24", "eval.num_beams=3"
    )
    vqa = json.loads((run / "eval" / "metrics_vqa.json").read_text())
    assert vqa["num_evaluated"] == 24
    assert {"overall", "yes/no", "number", "other"} <= set(vqa), vqa
    assert all(0 <= vqa[key] <= 100 for key in ("overall", "yes/no", "number", "other"))


def test_predict_and_transformers_export_generate_the_same(blip2_runs, sample, tmp_path):
    run = blip2_runs["caption"]
    images = [str(sample.image_root / "test" / name) for name in ("100001.jpg", "100002.jpg")]
    out = launch("predict.py", "--model", str(run), "--image", *images, "--num-beams", "1")
    lines = [line for line in out.stdout.splitlines() if line.startswith(str(sample.image_root))]
    assert len(lines) == 2 and all(line.split("\t")[1].strip() for line in lines), out.stdout

    export = tmp_path / "hf"
    launch("convert.py", "ours-to-hf", "--checkpoint", str(run), "--out", str(export))
    import transformers

    from blip2_megatron import load_model_and_preprocess

    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(export).eval()
    ours, image_processors, _ = load_model_and_preprocess(str(run))
    pixels = torch.stack([image_processors["eval"](path) for path in images])
    processor_ids = ours.builder.generation_inputs(["a photo of"] * 2)
    input_ids = processor_ids["input_ids"].masked_fill(
        processor_ids["image_slots"], hf.config.image_token_index
    )
    with torch.no_grad():
        theirs = hf.generate(
            pixel_values=pixels,
            input_ids=input_ids,
            attention_mask=processor_ids["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=12,
        )[:, input_ids.shape[1] :]
    mine = ours.generate_tokens({"image": pixels}, num_beams=1, max_new_tokens=12, min_new_tokens=0)
    assert torch.equal(mine, theirs[:, : mine.shape[1]]) and mine.shape == theirs.shape, (mine, theirs)
    # predict.py captions one image at a time: so does the comparison (batching may flip near-ties).
    for line, pixel in zip(lines, pixels):
        assert (
            line.split("\t")[1]
            == ours.generate({"image": pixel[None]}, num_beams=1, max_new_tokens=30, min_new_tokens=1)[0]
        )


# ------------------------------------------------------------------------------ MiniGPT-4
@pytest.fixture(scope="module")
def minigpt4_runs(tmp_path_factory, sample):
    root = tmp_path_factory.mktemp("minigpt4_chain")
    runs = {"stage1": root / "stage1", "stage2": root / "stage2"}
    _train(
        "minigpt4_stage1",
        runs["stage1"],
        *tiny_overrides("minigpt4_stage1", sample),
        "train.max_steps=40",
        "train.log_interval=10",
        "train.warmup_steps=5",
        "train.lr=3e-3",
    )
    _train(
        "minigpt4_stage2",
        runs["stage2"],
        *tiny_overrides("minigpt4_stage2", sample),
        f"model.init_checkpoint={runs['stage1']}",
        "train.max_steps=30",
        "train.log_interval=10",
        "train.warmup_steps=5",
        "train.lr=3e-3",
    )
    return runs


def test_minigpt4_stage1_trains_only_the_projection_on_two_sources(minigpt4_runs):
    run = minigpt4_runs["stage1"]
    stats = summary(run)
    # Tiny sizes: Q-Former width 64 -> LLM width 64, weight and bias.
    assert stats["trainable_params"] == 64 * 64 + 64, stats
    assert stats["data_sources"] == 2
    start, end = _falls(run, "loss", window=2)
    assert end < start, (start, end)


def test_minigpt4_stage2_continues_from_stage1_and_predicts_with_an_instruction(minigpt4_runs, sample):
    from blip2_megatron.convert.run_checkpoint import RunWeights, find_checkpoint

    stage1 = RunWeights(find_checkpoint(minigpt4_runs["stage1"]) / "weights")
    stage2 = RunWeights(find_checkpoint(minigpt4_runs["stage2"]) / "weights")
    assert set(stage2.keys()) == {"language_projection.weight", "language_projection.bias"}
    assert not torch.equal(
        stage1.read("language_projection.weight"), stage2.read("language_projection.weight")
    )
    image = str(sample.cc_sbu_align_annotation.parent / "image" / "0.jpg")
    out = launch(
        "predict.py",
        "--model",
        str(minigpt4_runs["stage2"]),
        "--image",
        image,
        "--prompt",
        "Describe this image in detail.",
        "--num-beams",
        "1",
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith(image))
    assert line.split("\t")[1].strip(), out.stdout
