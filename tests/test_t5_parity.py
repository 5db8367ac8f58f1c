"""Our tensor-parallel T5 (FlanT5's v1.1 maths) against transformers' T5ForConditionalGeneration.

Tiny random configs on CPU in fp32: logits and loss with and without encoder padding, the
``inputs_embeds`` path BLIP-2 takes and its gradient, greedy and beam-search tokens, and the
export that transformers loads (untied head kept). TP 2 equals TP 1 (two gloo processes,
one ``run_distributed`` call).
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed
from test_llm_parity import TOL, randomize

from blip2_megatron.convert.hf_llm import llm_config_from_hf, load_hf_llm_weights
from blip2_megatron.models import generation
from blip2_megatron.models.t5 import ParallelT5, relative_position_buckets

transformers = pytest.importorskip("transformers")

VOCAB = 256
HIDDEN = 48
TINY_T5 = dict(
    vocab_size=VOCAB,
    d_model=HIDDEN,
    d_kv=16,  # 4 heads of 16 = 64, not the model width: T5's d_kv is its own setting
    d_ff=96,
    num_layers=2,
    num_decoder_layers=3,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,  # short: the log-spaced buckets and the last one are reached
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def make_hf_t5(seed: int = 0, **overrides):
    config = transformers.T5Config(**{**TINY_T5, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config).eval()
    # transformers 5 builds every T5 with its head tied to the embedding (and unties on loading
    # only a file whose head differs): give FlanT5's head a weight of its own.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    randomize(model, seed)
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
    return model


def make_our_t5(hf_model) -> ParallelT5:
    from blip2_megatron.parallel import state

    cfg = llm_config_from_hf(hf_model.config.to_dict(), tp=state.tp_size())
    model = ParallelT5(cfg, init_weights=False).eval()
    load_hf_llm_weights(model, hf_model.state_dict())
    return model


def make_seq2seq_batch(seed: int = 0, batch: int = 3, source: int = 14, target: int = 9, vocab: int = VOCAB):
    """Encoder ids with right padding (row 0 unpadded), labels with -100 padding after an end token."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab, (batch, source), generator=gen)
    mask = torch.ones(batch, source, dtype=torch.long)
    labels = torch.randint(2, vocab, (batch, target), generator=gen)
    for row in range(1, batch):
        mask[row, source - 3 * row :] = 0
        labels[row, target - 2 * row :] = -100
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return input_ids, mask, labels


def test_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 300)[None]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 20)):
            ref = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
            ours = relative_position_buckets(distance, bidirectional, buckets, max_distance)
            assert torch.equal(ours, ref), (bidirectional, buckets)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_and_loss_match_transformers(single_process_group, padded):
    hf = make_hf_t5()
    ours = make_our_t5(hf)
    input_ids, mask, labels = make_seq2seq_batch()
    if not padded:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        ref = hf(input_ids=input_ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
    real = labels != -100
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(
        out.hidden_states[mask.bool()], ref.encoder_last_hidden_state[mask.bool()], **TOL
    )


def _embedded_inputs(hf, ours, seed: int = 3):
    """BLIP-2's encoder input: 4 query-like vectors, then the embedded (padded) prompt."""
    input_ids, mask, _ = make_seq2seq_batch(seed=seed)
    queries = 0.5 * torch.randn(input_ids.shape[0], 4, HIDDEN, generator=torch.Generator().manual_seed(seed))
    mask = torch.cat([torch.ones(input_ids.shape[0], 4, dtype=torch.long), mask], dim=1)
    hf_embeds = torch.cat([queries, hf.get_input_embeddings()(input_ids)], dim=1)
    our_embeds = torch.cat([queries, ours.get_input_embeddings()(input_ids)], dim=1)
    return hf_embeds, our_embeds, mask


GENERATION = {
    "greedy": dict(num_beams=1, max_new_tokens=10),
    "beam5": dict(num_beams=5, max_new_tokens=10, min_new_tokens=2),
    "beam3_return2_lp": dict(num_beams=3, max_new_tokens=8, num_return_sequences=2, length_penalty=-1.0),
}


def assert_t5_generates_like(hf, ours, cases=tuple(GENERATION)) -> None:
    hf_embeds, our_embeds, mask = _embedded_inputs(hf, ours)
    for name in cases:
        options = GENERATION[name]
        with torch.no_grad():
            ref = hf.generate(inputs_embeds=hf_embeds, attention_mask=mask, do_sample=False, **options)
        tokens = generation.generate(ours, our_embeds, mask, **options)
        ref = ref[:, 1:]  # transformers returns the decoder's start token first
        assert tokens.shape[1] <= options["max_new_tokens"]
        assert torch.equal(tokens, ref[:, : tokens.shape[1]]), (name, tokens, ref)
        assert (ref[:, tokens.shape[1] :] == 0).all(), name  # only padding beyond our length


# transformers' generate sizes its cache by the encoder's depth: give both stacks the same one there.
SAME_DEPTHS = dict(num_decoder_layers=TINY_T5["num_layers"])


def test_greedy_and_beam_tokens_match_transformers(single_process_group):
    hf = make_hf_t5(seed=1, **SAME_DEPTHS)
    assert_t5_generates_like(hf, make_our_t5(hf))


def test_inputs_embeds_path_and_its_gradient(single_process_group):
    hf = make_hf_t5()
    ours = make_our_t5(hf)
    hf_embeds, our_embeds, mask = _embedded_inputs(hf, ours)
    _, _, labels = make_seq2seq_batch(seed=4)
    hf_embeds, our_embeds = hf_embeds.detach().requires_grad_(), our_embeds.detach().requires_grad_()
    ref = hf(inputs_embeds=hf_embeds, attention_mask=mask, labels=labels)
    out = ours(inputs_embeds=our_embeds, attention_mask=mask, labels=labels)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(our_embeds.grad, hf_embeds.grad, **TOL)
    ref_grad = hf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad
    ours_grad = ours.encoder.layers[0].self_attn.relative_attention_bias.weight.grad
    torch.testing.assert_close(ours_grad, ref_grad, **TOL)


def test_export_loads_in_transformers_untied(single_process_group, tmp_path):
    from blip2_megatron.convert.hf_llm import save_hf_llm

    hf = make_hf_t5(seed=2, dense_act_fn="gelu")  # LAVIS's exact GELU survives the round trip too
    ours = make_our_t5(hf)
    assert ours.cfg.activation == "gelu"
    save_hf_llm(ours, tmp_path / "t5")
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5").eval()
    assert back.lm_head.weight.data_ptr() != back.shared.weight.data_ptr()
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    input_ids, mask, labels = make_seq2seq_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            back(input_ids=input_ids, attention_mask=mask, labels=labels).loss,
            hf(input_ids=input_ids, attention_mask=mask, labels=labels).loss,
            **TOL,  # the same weights; the reloaded model picks its own attention kernel
        )


def test_t5_v1_0_and_pipelining_are_refused_by_name():
    from blip2_megatron.config import ConfigError
    from blip2_megatron.convert.hf_llm import llm_config_from_hf

    v1_0 = transformers.T5Config(**{**TINY_T5, "feed_forward_proj": "relu"}).to_dict()
    with pytest.raises(ConfigError, match="ReLU FFN is not"):
        llm_config_from_hf(v1_0)
    scaled = {**transformers.T5Config(**TINY_T5).to_dict(), "scale_decoder_outputs": True}
    with pytest.raises(ConfigError, match="v1.0's head"):
        llm_config_from_hf(scaled)
    with pytest.raises(ConfigError, match="Megatron-LM dropped pipelining"):
        llm_config_from_hf(transformers.T5Config(**TINY_T5).to_dict(), pp=2)


def _tp2_checks(rank: int, world_size: int) -> dict[str, float]:
    from blip2_megatron.models.llm import gather_from_tp_ranks
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(2, 1)
    results = {}
    for vocab in (VOCAB, 251):  # 251: a padding row of the vocabulary on rank 1
        hf = make_hf_t5(vocab_size=vocab)
        ours = make_our_t5(hf)
        assert ours.encoder.layers[0].self_attn.relative_attention_bias.weight.shape == (8, 2)  # heads split
        input_ids, mask, labels = make_seq2seq_batch(vocab=vocab)
        ref = hf(input_ids=input_ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
        logits = gather_from_tp_ranks(out.logits)[..., :vocab]
        real = labels != -100
        torch.testing.assert_close(logits[real], ref.logits[real], **TOL)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        ref.loss.backward()
        out.loss.backward()
        # Each rank holds its heads' columns of the bias table: its gradient is that slice of HF's.
        heads = slice(2 * rank, 2 * rank + 2)
        ref_grad = hf.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad[:, heads]
        torch.testing.assert_close(
            ours.decoder.layers[0].self_attn.relative_attention_bias.weight.grad, ref_grad, **TOL
        )
        results[f"loss_{vocab}"] = float(out.loss)
    hf = make_hf_t5(seed=1, **SAME_DEPTHS)
    assert_t5_generates_like(hf, make_our_t5(hf), ("greedy", "beam5"))
    return results


@pytest.mark.dist
def test_tensor_parallel_2_matches_transformers():
    per_rank = run_distributed(_tp2_checks, 2)
    assert per_rank[0] == per_rank[1]
