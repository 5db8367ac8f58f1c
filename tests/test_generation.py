"""Greedy and beam search against transformers' generate(inputs_embeds=..., attention_mask=...).

Tiny random models, a batch of 2 with left padding on the second row (as BLIP-2 batches
prompts), CPU fp32. The end-of-text id is a token the model actually produces, so that
hypotheses finish at different lengths and the stopping rules are exercised.
"""

from __future__ import annotations

import pytest
import torch
from test_llm_parity import HIDDEN, make_hf_model, make_ours

from blip2_megatron.models import cpu_linear
from blip2_megatron.models.generation import generate

transformers = pytest.importorskip("transformers")

PAD = 1


def prompt_embeds(seed: int = 0, batch: int = 2, seq: int = 7, left_pad: int = 3):
    gen = torch.Generator().manual_seed(seed)
    embeds = 0.5 * torch.randn(batch, seq, HIDDEN, generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, :left_pad] = 0
    return embeds, mask


def frequent_tokens(hf, embeds, mask) -> tuple[int, int]:
    """Two tokens the model emits early on, used as end-of-text ids."""
    free = hf.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        do_sample=False,
        num_beams=3,
        num_return_sequences=3,
        max_new_tokens=5,
        eos_token_id=None,
        pad_token_id=PAD,
    )
    return int(free[0, 2]), int(free[4, 3])


CASES = {
    "greedy": dict(num_beams=1, max_new_tokens=12),
    "greedy_min_new": dict(num_beams=1, max_new_tokens=12, min_new_tokens=4),
    "beam3": dict(num_beams=3, max_new_tokens=10, min_new_tokens=2),
    "beam3_return2_lp": dict(num_beams=3, max_new_tokens=10, num_return_sequences=2, length_penalty=0.5),
    "beam4_two_eos_neg_lp": dict(num_beams=4, max_new_tokens=8, length_penalty=-1.0, two_eos=True),
    "beam3_early_stopping": dict(num_beams=3, max_new_tokens=8, early_stopping=True),
    "beam3_never": dict(num_beams=3, max_new_tokens=8, early_stopping="never", length_penalty=2.0),
}


def assert_generates_like(hf, ours, cases: tuple[str, ...], label: str) -> None:
    """``generate`` on ``ours`` gives transformers' tokens for each of :data:`CASES` named.

    The end-of-text id is a token ``hf`` emits early (:func:`frequent_tokens`)."""
    embeds, mask = prompt_embeds()
    eos, _ = frequent_tokens(hf, embeds, mask)
    for case in cases:
        kwargs = CASES[case]
        ref = hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
            **kwargs,
        )
        out = generate(ours, embeds, mask, eos_token_id=eos, pad_token_id=PAD, **kwargs)
        assert out.shape == ref.shape and torch.equal(out, ref), f"{label} {case}:\nours {out}\nHF   {ref}"


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_generation_is_token_identical_to_transformers(single_process_group, name):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    embeds, mask = prompt_embeds()
    eos, second_eos = frequent_tokens(hf, embeds, mask)
    ended = 0
    for case, kwargs in CASES.items():
        kwargs = dict(kwargs)
        eos_ids = [eos, second_eos] if kwargs.pop("two_eos", False) else eos
        ref = hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=False,
            eos_token_id=eos_ids,
            pad_token_id=PAD,
            **kwargs,
        )
        out = generate(ours, embeds, mask, eos_token_id=eos_ids, pad_token_id=PAD, **kwargs)
        assert out.shape == ref.shape and torch.equal(out, ref), f"{case}:\nours {out}\nHF   {ref}"
        ended += int(torch.isin(out, torch.tensor(eos_ids)).any())
    assert ended >= 3, "the end-of-text token should end some hypotheses"
    # Our side generated through packed oneDNN weights (models/cpu_linear.py), head included.
    if torch.backends.mkldnn.is_available():
        head = ours.embed_tokens.weight if ours._head_reads_embedding else ours.lm_head.weight
        assert id(head) in cpu_linear._packed
        assert all(id(p) in cpu_linear._packed for p in ours.layers[0].mlp.parameters() if p.dim() == 2)


def test_repetition_penalty_matches_transformers_without_padding(single_process_group):
    """With a left-padded batch HF skips the penalty on the first <padding length> *new* tokens
    (its prompt_ignore_length is meant for prompt ids, which inputs_embeds generation has none
    of); we penalise every generated token, so parity is checked on an unpadded batch."""
    hf = make_hf_model("opt")
    ours = make_ours(hf)
    embeds, mask = prompt_embeds(left_pad=0)
    for kwargs in (dict(num_beams=1, max_new_tokens=12), dict(num_beams=4, max_new_tokens=8)):
        ref = hf.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=False,
            repetition_penalty=1.5,
            pad_token_id=PAD,
            **kwargs,
        )
        out = generate(ours, embeds, mask, repetition_penalty=1.5, eos_token_id=2, pad_token_id=PAD, **kwargs)
        assert torch.equal(out, ref), f"ours {out}\nHF   {ref}"


def test_generation_restores_training_mode_and_rejects_bad_arguments(single_process_group):
    hf = make_hf_model("opt")
    ours = make_ours(hf).train()
    embeds, mask = prompt_embeds()
    out = generate(ours, embeds, mask, max_new_tokens=3, eos_token_id=[], pad_token_id=PAD)
    assert out.shape == (2, 3) and ours.training
    with pytest.raises(ValueError, match="num_return_sequences"):
        generate(ours, embeds, mask, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, embeds, mask, max_new_tokens=0)
