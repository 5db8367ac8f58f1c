"""TP=2 equals TP=1: two gloo processes on CPU against the transformers reference.

transformers' model is the TP=1 reference (tests/test_llm_parity.py shows ours at TP=1 equals
it). Everything runs inside one ``run_distributed`` call, since each spawn costs ~10-15 s:
logits (gathered over the TP group), loss, gradients of the trainable input embeddings and
of sharded weights, the HF -> ours -> HF round trip, and generation; for OPT and LLaMA-GQA,
and with a vocabulary (251) that does not divide by the TP size.
"""

from __future__ import annotations

import pytest
import torch
from dist_utils import run_distributed

TP = 2
# (tiny model, config overrides)
CASES = [
    ("opt", {}),
    ("llama_gqa", {}),
    ("opt", {"vocab_size": 251}),  # tied embedding and head, one padding row on rank 1
    ("llama_mha_bias", {"vocab_size": 251}),
]


def _check_forward_backward(name: str, overrides: dict) -> dict[str, float]:
    from test_llm_parity import HIDDEN, TOL, make_batch, make_hf_model, make_ours

    from blip2_megatron.convert.hf_llm import export_hf_state_dict
    from blip2_megatron.models.llm import gather_from_tp_ranks
    from blip2_megatron.parallel import state

    vocab = overrides.get("vocab_size", 256)
    hf = make_hf_model(name, **overrides)  # same seed on every rank: identical weights
    ours = make_ours(hf)
    assert (
        ours.padded_vocab_size % TP == 0 and ours.embed_tokens.weight.shape[0] == ours.padded_vocab_size // TP
    )

    input_ids, mask, labels = make_batch(vocab=vocab)
    gen = torch.Generator().manual_seed(1)
    queries = 0.5 * torch.randn(input_ids.shape[0], 4, HIDDEN, generator=gen)
    mask = torch.cat([torch.ones(input_ids.shape[0], 4, dtype=torch.long), mask], dim=1)
    labels = torch.cat([torch.full((input_ids.shape[0], 4), -100), labels], dim=1)

    ref_queries = queries.clone().requires_grad_()
    ref = hf(
        inputs_embeds=torch.cat([ref_queries, hf.get_input_embeddings()(input_ids)], dim=1),
        attention_mask=mask,
        labels=labels,
    )
    ref.loss.backward()
    our_queries = queries.clone().requires_grad_()
    out = ours(
        inputs_embeds=torch.cat([our_queries, ours.get_input_embeddings()(input_ids)], dim=1),
        attention_mask=mask,
        labels=labels,
    )
    out.loss.backward()

    logits = gather_from_tp_ranks(out.logits.detach())
    assert logits.shape[-1] == ours.padded_vocab_size
    assert torch.isneginf(logits[..., vocab:]).all(), "padded vocabulary columns must be -inf"
    real = mask.bool()
    torch.testing.assert_close(logits[..., :vocab][real], ref.logits.detach()[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    torch.testing.assert_close(our_queries.grad, ref_queries.grad, **TOL)

    # Sharded weights: q_proj holds this rank's rows, o_proj this rank's columns.
    hf_layer = (hf.model.decoder.layers if name == "opt" else hf.model.layers)[1]
    rows = hf_layer.self_attn.q_proj.weight.shape[0] // TP
    our_attn = ours.layers[1].self_attn
    rank = state.tp_rank()
    hf_o = hf_layer.self_attn.out_proj if name == "opt" else hf_layer.self_attn.o_proj
    torch.testing.assert_close(
        our_attn.q_proj.weight.grad,
        hf_layer.self_attn.q_proj.weight.grad[rank * rows : (rank + 1) * rows],
        **TOL,
    )
    torch.testing.assert_close(
        our_attn.o_proj.weight.grad, hf_o.weight.grad[:, rank * rows : (rank + 1) * rows], **TOL
    )

    # HF -> ours (sharded) -> HF is the identity.
    exported = export_hf_state_dict(ours)
    reference = hf.state_dict()
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        assert torch.equal(exported[key], tensor), key
    return {
        "logits": float((logits[..., :vocab][real] - ref.logits.detach()[real]).abs().max()),
        "loss": float((out.loss - ref.loss).abs()),
        "input_grad": float((our_queries.grad - ref_queries.grad).abs().max()),
    }


def _check_generation(name: str, overrides: dict) -> None:
    from test_generation import assert_generates_like
    from test_llm_parity import make_hf_model, make_ours

    hf = make_hf_model(name, **overrides)
    assert_generates_like(hf, make_ours(hf), ("greedy", "beam3_return2_lp"), name)


def _tp2_checks(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(TP, 1)
    diffs = {}
    for name, overrides in CASES:
        diffs[f"{name}{overrides or ''}"] = _check_forward_backward(name, overrides)
    _check_generation("opt", {"vocab_size": 251})
    _check_generation("llama_gqa", {})
    return diffs


@pytest.mark.dist
def test_tensor_parallel_2_matches_transformers():
    per_rank = run_distributed(_tp2_checks, TP)
    assert per_rank[0] == per_rank[1]  # both TP ranks see the same gathered results
