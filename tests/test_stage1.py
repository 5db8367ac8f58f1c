"""Stage-1 model: ITC / ITM / ITG losses, image ids, DP gathering, overfitting a tiny batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import run_distributed

from blip2_megatron.config import ConfigError, build_model_config
from blip2_megatron.data.batch import Stage1BatchBuilder, image_id_codes
from blip2_megatron.models.stage1 import (
    BatchGatherer,
    Blip2Stage1,
    positive_pairs,
    sample_hard_negatives,
)

WORDS = "a an the of on in photo picture cat dog red blue green circle square big small table two".split()
CAPTIONS = ["a photo of a cat", "a dog on the table", "a red circle", "two big blue squares"]


def make_tiny_tokenizer(directory: Path):
    """A WordPiece BERT tokenizer over a handful of words, with [DEC] as bos (the last id)."""
    from transformers import BertTokenizerFast

    directory = Path(directory) / "tiny_bert_tokenizer"
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "vocab.txt").exists():  # distributed workers reuse the parent's file
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "[DEC]"]
        (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast.from_pretrained(str(directory), bos_token="[DEC]")


def tiny_config(tokenizer, **qformer):
    overrides = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        max_txt_len=10,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
    )
    overrides.update(qformer)
    return build_model_config("tiny_stage1", {"qformer": overrides})


def build_model(tokenizer, seed: int = 0, dp_group=None, **qformer) -> Blip2Stage1:
    torch.manual_seed(seed)
    return Blip2Stage1(tiny_config(tokenizer, **qformer), dp_group=dp_group)


def tiny_samples(n: int = 4, seed: int = 1, image_ids=None) -> dict:
    gen = torch.Generator().manual_seed(seed)
    samples = {"image": torch.randn(n, 3, 32, 32, generator=gen), "text_input": (CAPTIONS * n)[:n]}
    if image_ids is not None:
        samples["image_id"] = image_ids
    return samples


def tiny_batch(tokenizer, n: int = 4, seed: int = 1, image_ids=None) -> dict:
    """Model tensors of :func:`tiny_samples` from the stage-1 batch builder."""
    return Stage1BatchBuilder(tokenizer, tiny_config(tokenizer))(tiny_samples(n, seed, image_ids))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize(
    "loss_name, must_get_grad",
    [
        ("loss_itc", ["vision_proj.weight", "text_proj.weight", "temp", "query_encoder.query_tokens"]),
        (
            "loss_itm",
            ["itm_head.weight", "query_encoder.qformer.encoder.layer.0.crossattention.attention.key.weight"],
        ),
        (
            "loss_lm",
            ["lm_head.transform.dense.weight", "query_encoder.qformer.embeddings.word_embeddings.weight"],
        ),
    ],
)
def test_each_loss_backward_gives_finite_grads(tokenizer, loss_name, must_get_grad):
    model = build_model(tokenizer).train()
    out = model(tiny_batch(tokenizer))
    assert set(out) == {"loss", "loss_itc", "loss_itm", "loss_lm"}
    torch.testing.assert_close(out["loss"], out["loss_itc"] + out["loss_itm"] + out["loss_lm"])
    out[loss_name].backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for name in must_get_grad:
        assert name in grads and grads[name].abs().sum() > 0, f"{loss_name} gave no gradient to {name}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    # The frozen ViT gets no gradient and stays in eval mode under model.train().
    assert not any(name.startswith("query_encoder.visual_encoder.") for name in grads)
    assert not model.query_encoder.visual_encoder.training


def test_losses_fall_when_overfitting_a_tiny_batch(tokenizer):
    model = build_model(tokenizer).train()
    batch = tiny_batch(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(45):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert last[name] < first[name], (name, first, last)


def test_string_image_ids_make_same_id_pairs_positive(tokenizer):
    ids = ["coco_1", "coco_1", "coco_2"]
    codes = image_id_codes(ids)
    assert codes[0] == codes[1] != codes[2]
    # Deterministic (not Python's salted hash) and 123 / "123" name the same image.
    assert torch.equal(image_id_codes(["coco_1", 123]), image_id_codes(["coco_1", "123"]))
    assert torch.equal(image_id_codes(torch.tensor([123])), image_id_codes([123]))

    model = build_model(tokenizer).eval()
    batch = tiny_batch(tokenizer, 3, image_ids=ids)
    assert torch.equal(batch["image_codes"], codes)
    with torch.no_grad():
        image_feats = model.image_embeds_itc(batch["image"])
        text_feat = model.text_embeds_itc(batch["input_ids"], batch["attention_mask"])
        itc = model.compute_itc(image_feats, text_feat, codes)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(itc.targets, expected)
    # The loss is LAVIS's: smoothed soft targets 0.9 * t + 0.1 / N, both directions.
    smoothed = 0.9 * expected + 0.1 / 3
    manual = (
        -(
            (smoothed * itc.sim_i2t.log_softmax(1)).sum(1).mean()
            + (smoothed * itc.sim_t2i.log_softmax(1)).sum(1).mean()
        )
        / 2
    )
    torch.testing.assert_close(itc.loss, manual)
    # Without ids only the diagonal is positive.
    no_ids = model.compute_itc(image_feats, text_feat, None)
    torch.testing.assert_close(no_ids.targets, torch.eye(3))
    # The whole forward accepts string ids.
    out = build_model(tokenizer).train()(batch)
    assert torch.isfinite(out["loss"])


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    positives = positive_pairs(
        torch.tensor([7, 7, 8, 9]), torch.tensor([7, 7, 8, 9]), offset=0, local_size=4, total=4
    )
    similarity = torch.randn(4, 4) * 5
    for _ in range(50):
        picks = sample_hard_negatives(similarity, positives)
        assert not positives[torch.arange(4), picks].any()
    # A row with no negative at all (every candidate shares its id) still draws an index.
    all_positive = torch.ones(2, 2, dtype=torch.bool)
    assert sample_hard_negatives(torch.zeros(2, 2), all_positive).shape == (2,)


def test_retrieval_helpers(tokenizer):
    from blip2_megatron.inference import Blip2Predictor

    model = build_model(tokenizer).eval()
    predictor = Blip2Predictor(model, model.cfg, Stage1BatchBuilder(tokenizer, model.cfg))
    samples = tiny_samples(3)
    with torch.no_grad():
        query_output, image_embeds = model.forward_image(samples["image"])
        image_feats = predictor.image_features(samples["image"])
        text_feat = predictor.text_features(samples["text_input"])
        scores = predictor.itm_scores(image_embeds, samples["text_input"])
        tokens = predictor.builder.text_tokens(samples["text_input"])
        direct = model.itm_scores(image_embeds, tokens["input_ids"], tokens["attention_mask"])
        probs = predictor.itm_scores(image_embeds, samples["text_input"], as_probability=True)
    assert query_output.shape == (3, 8, 64) and image_embeds.shape == (3, 17, 64)
    assert image_feats.shape == (3, 8, 32) and text_feat.shape == (3, 32)
    torch.testing.assert_close(image_feats.norm(dim=-1), torch.ones(3, 8))
    torch.testing.assert_close(text_feat.norm(dim=-1), torch.ones(3))
    assert scores.shape == (3,)
    torch.testing.assert_close(direct, scores)
    logits = model._itm_logits(image_embeds, tokens["input_ids"], tokens["attention_mask"])
    torch.testing.assert_close(probs, logits.softmax(dim=-1)[:, 1])
    assert ((probs > 0) & (probs < 1)).all()


def test_temperature_is_clamped(tokenizer):
    model = build_model(tokenizer).train()
    with torch.no_grad():
        model.temp.fill_(5.0)
    model(tiny_batch(tokenizer, 2))
    assert model.temp.item() == pytest.approx(0.5)


def test_tokenizer_must_match_config(tokenizer):
    cfg = tiny_config(tokenizer, bos_token_id=len(tokenizer) - 2)
    with pytest.raises(ConfigError, match="bos"):
        Stage1BatchBuilder(tokenizer, cfg)


# ------------------------------------------------------------------ data parallel
def _itc_on_rank(rank: int, world_size: int, tokenizer_dir: str, splits: list[list[int]]) -> list[dict]:
    tokenizer = make_tiny_tokenizer(Path(tokenizer_dir))
    model = build_model(tokenizer, dp_group=dist.group.WORLD).eval()
    batch = tiny_batch(tokenizer, 4, image_ids=DIST_IDS)
    results = []
    for split in splits:
        start = sum(split[:rank])
        local = slice(start, start + split[rank])
        local_batch = {name: tensor[local] for name, tensor in batch.items()}
        image_feats = model.image_embeds_itc(local_batch["image"])
        text_feat = model.text_embeds_itc(local_batch["input_ids"], local_batch["attention_mask"])
        itc = model.compute_itc(image_feats, text_feat, local_batch["image_codes"])
        model.zero_grad()
        itc.loss.backward()  # the local copy keeps its gradient
        grad = model.vision_proj.weight.grad
        full = model(local_batch)  # ITM hard negatives come from the gathered batch
        results.append(
            {
                "loss_itc": itc.loss.item(),
                "has_grad": bool(grad is not None and grad.abs().sum() > 0),
                "loss": full["loss"].item(),
            }
        )
    return results


DIST_IDS = ["coco_1", "coco_2", "coco_1", "coco_3"]  # coco_1 spans both ranks


@pytest.mark.dist
def test_itc_gathered_over_two_processes_equals_one_process_on_whole_batch(tokenizer, tmp_path):
    make_tiny_tokenizer(tmp_path)
    model = build_model(tokenizer).eval()
    batch = tiny_batch(tokenizer, 4, image_ids=DIST_IDS)
    with torch.no_grad():
        whole = model.compute_itc(
            model.image_embeds_itc(batch["image"]),
            model.text_embeds_itc(batch["input_ids"], batch["attention_mask"]),
            batch["image_codes"],
        ).loss.item()
    splits = [[2, 2], [3, 1]]  # equal and unequal per-rank batch sizes
    per_rank = run_distributed(_itc_on_rank, 2, str(tmp_path), splits)
    for i, split in enumerate(splits):
        results = [rank_results[i] for rank_results in per_rank]
        # Each rank averages over its own rows; weighting by rows gives the global mean.
        gathered = sum(r["loss_itc"] * n for r, n in zip(results, split)) / sum(split)
        assert gathered == pytest.approx(whole, rel=1e-5, abs=1e-6), (split, results, whole)
        assert all(r["has_grad"] for r in results)
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in results)


def test_batch_gatherer_without_group_is_identity():
    tensor = torch.randn(3, 2, requires_grad=True)
    gatherer = BatchGatherer(None, 3, torch.device("cpu"))
    assert gatherer(tensor) is tensor and gatherer.offset == 0 and gatherer.total == 3
