"""Our ViT and Q-Former against Hugging Face transformers' Blip2 modules (tiny random, CPU fp32)."""

from __future__ import annotations

import pytest
import torch
from test_stage1 import make_tiny_tokenizer

from blip2_megatron.config import Blip2Config, QFormerConfig, VisionConfig
from blip2_megatron.convert.vision_qformer import hf_vision_qformer_to_ours, load_into
from blip2_megatron.data.batch import Stage1BatchBuilder
from blip2_megatron.models.qformer import QFormer, causal_text_mask
from blip2_megatron.models.stage1 import Blip2Stage1
from blip2_megatron.models.vision import VisionEncoder, freeze_vision, interpolate_position_embedding

transformers = pytest.importorskip("transformers")

EPS = 1e-6  # HF applies the blocks' eps to post_layernorm too; ours has its own ln_vision_eps
HF_VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    qkv_bias=True,
    layer_norm_eps=EPS,
)
HF_QFORMER = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
    cross_attention_frequency=2,  # layers 0 and 2 cross-attend, layer 1 does not
    encoder_hidden_size=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
OUR_VISION = dict(
    image_size=32,
    patch_size=8,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    intermediate_size=256,
    layer_norm_eps=EPS,
    ln_vision_eps=EPS,
    frozen_dtype="fp32",
)
OUR_QFORMER = dict(
    hidden_size=64,
    num_layers=3,
    num_heads=4,
    intermediate_size=128,
    max_position_embeddings=32,
    cross_attention_frequency=2,
    encoder_hidden_size=64,
    hidden_dropout_prob=0.0,
    attention_dropout_prob=0.0,
    num_query_tokens=8,
    embed_dim=32,
)
TOL = dict(rtol=1e-5, atol=1e-5)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from their defaults (HF inits the ViT with std 1e-10), LayerNorms included."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        if "norm" in name.lower() and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
        else:
            param.copy_(0.1 * torch.randn(param.shape, generator=gen))


def hf_vision_model():
    config = transformers.Blip2VisionConfig(**HF_VISION, attn_implementation="eager")
    model = transformers.Blip2VisionModel(config).eval()
    randomize(model)
    return model


def test_vision_encoder_matches_hf():
    hf = hf_vision_model()
    ours = VisionEncoder(VisionConfig(**OUR_VISION)).eval()
    report = load_into(ours, hf.state_dict())
    assert report.missing == [] and report.unexpected == []
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.dtype == torch.float32 and got.shape == (3, 17, 64)
    torch.testing.assert_close(got, expected, **TOL)


def test_qformer_query_pass_matches_hf():
    config = transformers.Blip2QFormerConfig(**HF_QFORMER, attn_implementation="eager")
    hf = transformers.Blip2QFormerModel(config).eval()
    randomize(hf)
    ours = QFormer(QFormerConfig(**OUR_QFORMER), with_text=False).eval()
    report = load_into(ours, hf.state_dict())
    assert report.missing == [] and report.unexpected == []
    queries, image = torch.randn(2, 8, 64), torch.randn(2, 17, 64)
    with torch.no_grad():
        expected = hf(
            query_embeds=queries, encoder_hidden_states=image, encoder_attention_mask=torch.ones(2, 17)
        ).last_hidden_state
        got = ours(queries, image).last_hidden_state
    torch.testing.assert_close(got, expected, **TOL)


def _retrieval_pair(tmp_path):
    """A tiny HF Blip2ForImageTextRetrieval and our stage-1 model holding the same weights."""
    tokenizer = make_tiny_tokenizer(tmp_path)
    vocab = len(tokenizer)
    hf_config = transformers.Blip2Config(
        vision_config=HF_VISION,
        qformer_config=dict(HF_QFORMER, vocab_size=vocab, use_qformer_text_input=True),
        num_query_tokens=8,
        image_text_hidden_size=32,
        attn_implementation="eager",
    )
    hf = transformers.Blip2ForImageTextRetrieval(hf_config).eval()
    randomize(hf, seed=1)
    cfg = Blip2Config(
        kind="stage1",
        vision=VisionConfig(**OUR_VISION),
        qformer=QFormerConfig(
            **OUR_QFORMER, vocab_size=vocab, bos_token_id=tokenizer.bos_token_id, max_txt_len=12
        ),
    )
    ours = Blip2Stage1(cfg).eval()
    converted, unconsumed = hf_vision_qformer_to_ours(hf.state_dict())
    assert unconsumed == []
    report = load_into(ours, converted)
    assert report.unexpected == []
    # The HF retrieval model has no temperature and no ITG head.
    assert sorted(k for k in report.missing if not k.startswith("lm_head.")) == ["temp"]
    return hf, ours, tokenizer


def test_stage1_itc_and_itm_match_hf_retrieval_model(tmp_path):
    """Vision + Q-Former modes (a) query-only, (b) text-only and (c) query+text against HF."""
    hf, ours, tokenizer = _retrieval_pair(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    texts = ["a photo of a red circle", "small cat"]
    tokens = Stage1BatchBuilder(tokenizer, ours.cfg).text_tokens(texts)
    input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    with torch.no_grad():
        hf_itm = hf(pixels, input_ids, attention_mask, use_image_text_matching_head=True)
        hf_itc = hf(pixels, input_ids, attention_mask, use_image_text_matching_head=False)
        image_embeds = ours.query_encoder.encode_image(pixels)
        itm_logits = ours._itm_logits(image_embeds, input_ids, attention_mask)
        image_feats = ours.image_embeds_itc(image_embeds=image_embeds)
        text_feat = ours.text_embeds_itc(input_ids, attention_mask)
        similarity = torch.einsum("bqe,ne->bnq", image_feats, text_feat).amax(dim=-1)
        itm_positive = ours.itm_scores(image_embeds, input_ids, attention_mask)
    torch.testing.assert_close(itm_logits, hf_itm.logits_per_image, **TOL)
    torch.testing.assert_close(itm_positive, hf_itm.logits_per_image[:, 1], **TOL)
    torch.testing.assert_close(similarity, hf_itc.logits_per_image, **TOL)


def _joint_reference(qformer: QFormer, queries, image, input_ids, attention_mask):
    """Mode (d) computed the long way: one pass over [queries, text] with a UniLM-style mask."""
    num_q, length = queries.shape[1], input_ids.shape[1]
    batch = queries.shape[0]
    query_rows = torch.zeros(batch, 1, num_q, num_q + length, dtype=torch.bool)
    query_rows[..., :num_q] = True  # queries see only queries, as in the query-only pass
    text_rows = causal_text_mask(attention_mask, num_q)
    mask = torch.cat([query_rows, text_rows], dim=2)
    hidden = qformer.embed(query_embeds=queries, input_ids=input_ids)
    return qformer.encoder(hidden, mask, num_q, image).last_hidden_state[:, num_q:]


def test_decode_text_reuses_query_keys_values_and_is_causal():
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(**OUR_QFORMER, vocab_size=40, bos_token_id=39)).eval()
    randomize(qformer, seed=2)
    queries, image = torch.randn(2, 8, 64), torch.randn(2, 17, 64)
    input_ids = torch.randint(5, 39, (2, 7))
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, 5:] = 0
    with torch.no_grad():
        cached = qformer(queries, image, return_key_values=True).key_values
        decoded = qformer.decode_text(input_ids, attention_mask, cached).last_hidden_state
        reference = _joint_reference(qformer, queries, image, input_ids, attention_mask)
        changed = input_ids.clone()
        changed[:, 4:] = 5
        decoded_changed = qformer.decode_text(changed, attention_mask, cached).last_hidden_state
    torch.testing.assert_close(decoded, reference, **TOL)
    # Position t sees only tokens <= t: changing tokens from 4 on leaves 0..3 untouched.
    torch.testing.assert_close(decoded_changed[:, :4], decoded[:, :4], rtol=0, atol=0)
    assert not torch.allclose(decoded_changed[:, 4:], decoded[:, 4:])


def test_grad_checkpointing_gives_same_outputs_and_grads():
    torch.manual_seed(0)
    pixels, queries = torch.randn(2, 3, 32, 32), torch.randn(2, 8, 64)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        vision = VisionEncoder(VisionConfig(**OUR_VISION, grad_checkpointing=ckpt)).train()
        qformer = QFormer(QFormerConfig(**OUR_QFORMER, grad_checkpointing=ckpt)).train()
        out = qformer(queries, vision(pixels)).last_hidden_state
        out.square().mean().backward()
        grads = [p.grad.clone() for p in (*vision.parameters(), *qformer.parameters()) if p.grad is not None]
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_eva_key_bias_is_not_trained():
    vision = VisionEncoder(VisionConfig(**OUR_VISION)).train()
    vision(torch.randn(2, 3, 32, 32)).sum().backward()
    bias_grad = vision.encoder.layers[0].self_attn.qkv.bias.grad
    q_grad, k_grad, v_grad = bias_grad.chunk(3)
    assert torch.count_nonzero(k_grad) == 0
    assert torch.count_nonzero(q_grad) > 0 and torch.count_nonzero(v_grad) > 0


def test_frozen_half_vision_encoder_stays_eval_and_runs():
    torch.manual_seed(0)
    vision = VisionEncoder(VisionConfig(**OUR_VISION, drop_path_rate=0.2))
    pixels = torch.randn(2, 3, 32, 32)
    reference = vision.eval()(pixels)
    freeze_vision(vision, torch.bfloat16)
    parent = torch.nn.Sequential(vision)
    parent.train()
    assert not vision.training and not any(m.training for m in vision.modules())
    assert not any(p.requires_grad for p in vision.parameters())
    qkv = vision.encoder.layers[0].self_attn.qkv
    assert (
        qkv.weight.dtype == torch.bfloat16
        and vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    )
    assert vision.post_layernorm.weight.dtype == torch.float32
    assert vision.embeddings.position_embedding.dtype == torch.float32
    out = vision(pixels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


def test_interpolate_position_embedding():
    pos = torch.randn(1, 17, 8)
    assert interpolate_position_embedding(pos, 16) is pos  # same size: unchanged
    resized = interpolate_position_embedding(pos, 36)
    assert resized.shape == (1, 37, 8)
    torch.testing.assert_close(resized[:, 0], pos[:, 0])  # CLS kept
    constant = torch.ones(1, 17, 8)
    torch.testing.assert_close(interpolate_position_embedding(constant, 49), torch.ones(1, 50, 8))
    with pytest.raises(ValueError, match="square"):
        interpolate_position_embedding(pos, 30)


def test_load_into_resizes_position_embedding_for_higher_resolution():
    small = VisionEncoder(VisionConfig(**OUR_VISION))  # 32 px -> 4x4 patches
    large = VisionEncoder(VisionConfig(**dict(OUR_VISION, image_size=48)))  # 6x6 patches
    report = load_into(large, small.state_dict())
    assert report.resized == ["embeddings.position_embedding"]
    assert large.embeddings.position_embedding.shape == (1, 37, 64)
    assert large(torch.randn(1, 3, 48, 48)).shape == (1, 37, 64)
