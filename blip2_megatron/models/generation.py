"""Greedy, sampling and beam-search decoding over a tensor-parallel :class:`ParallelCausalLM`
or encoder-decoder :class:`~blip2_megatron.models.t5.ParallelT5`.

Generation starts from input embeddings (BLIP-2: projected query outputs followed by the
prompt's token embeddings) with a left-padded attention mask, runs the prompt once to fill
a :class:`KVCache`, then feeds one token per step. An encoder-decoder runs its encoder
once over the inputs (any padding side) and decodes from its start token; each decoder
layer computes the cross-attention keys and values of the encoder's output once and keeps
them in the cache; only new tokens are returned, without the start token. Only the last position's logits are
computed; they are all-gathered over the TP group (``[B, V/tp] -> [B, V]``) and the
vocabulary padding is dropped, so every TP rank makes the same decisions on the same full
distribution without further communication.

Semantics follow ``transformers`` 5.23 ``generate(inputs_embeds=..., attention_mask=...)``
(token-identical outputs on the same weights are tested):

* only new tokens are returned (HF does the same when given embeddings without ids);
* position ids are ``cumsum(mask) - 1``, continuing by one per new token;
* after an end-of-text token a greedy row emits ``pad_token_id``;
* ``min_new_tokens`` forbids end-of-text tokens before that many tokens;
  ``repetition_penalty`` divides positive / multiplies negative scores of tokens already
  generated (applied to logits in greedy search, to log-probabilities in beam search);
* beam search keeps ``2 * num_beams`` candidates per step (more with several end tokens),
  scores a finished hypothesis as ``sum_logprobs / generated_len ** length_penalty`` where
  the length counts the new tokens including the end token, and stops with HF's default
  heuristic (``early_stopping=False``): when the best running beam, scored at its current
  length, cannot beat the worst of ``num_beams`` finished hypotheses. ``early_stopping=True``
  stops once ``num_beams`` hypotheses are finished; ``"never"`` uses the canonical bound.
* sampling (``do_sample=True``, ``num_beams=1``) processes scores as HF does: the penalties
  above, then temperature, top-k (ties with the k-th score kept), top-p (the smallest set
  of most likely tokens whose probability reaches ``top_p``, at least one), then one draw
  per row with ``torch.multinomial``. With the same seed (HF draws from the global
  generator, we from ``generator``) the same tokens come out.

Extensions beyond HF's defaults (off unless asked for, so the above stays exact):

* ``stop_sequences``: token-id sequences that finish a row like an end-of-text token when
  its new tokens end with one (multi-token end symbols such as MiniGPT-4's "###");
* ``streamer``: called after every step with the step's new tokens ``[B]`` (``pad_token_id``
  for rows already finished); it returns True to stop the whole generation. Greedy and
  sampling only: beams are re-ordered at every step, so no token is final before the end.

Tensor parallelism: the sampled tokens and a streamer's decision to stop are taken on TP
rank 0 and broadcast over the TP group, so every rank continues with the same tokens even
if the ranks' generators differ (or are unseeded); only TP rank 0's ``generator`` matters.

Pipeline parallelism is not supported here (``pp == 1``): the eval path runs whole models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from blip2_megatron.models.llm import KVCache, ParallelCausalLM, gather_from_tp_ranks
from blip2_megatron.models.t5 import ParallelT5, Seq2SeqCache
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)

_NEG = -1.0e9  # "impossible" score, as HF uses, so that sums stay finite


def _eos_tensor(eos_token_id: int | Sequence[int] | None, device) -> torch.Tensor:
    if eos_token_id is None:
        return torch.empty(0, dtype=torch.long, device=device)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _from_tp_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as TP rank 0 holds it, on every rank of the TP group."""
    if state.tp_size() == 1:
        return tensor
    group = state.tp_group()
    tensor = tensor.contiguous()
    torch.distributed.broadcast(tensor, src=torch.distributed.get_global_rank(group, 0), group=group)
    return tensor


class _StopSequences:
    """Which rows' generated tokens end with one of the given token-id sequences."""

    def __init__(self, sequences: Sequence[Sequence[int]] | None, device):
        self.sequences = []
        for seq in sequences or ():
            if len(seq) == 0:
                raise ValueError("stop_sequences holds an empty sequence")
            self.sequences.append(torch.tensor(list(seq), dtype=torch.long, device=device))

    def hit(self, generated: torch.Tensor) -> torch.Tensor:
        """``generated [..., L]`` -> bool ``[...]``: the last tokens equal a stop sequence."""
        hit = torch.zeros(generated.shape[:-1], dtype=torch.bool, device=generated.device)
        for seq in self.sequences:
            if generated.shape[-1] >= seq.numel():
                hit |= (generated[..., -seq.numel() :] == seq).all(dim=-1)
        return hit


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming the sampling option that is out of range."""
    if temperature <= 0.0:
        raise ValueError(f"temperature={temperature} must be > 0 when sampling (use do_sample=False)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 = no top-k filtering)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = no top-p filtering)")


def sampling_scores(
    scores: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """HF's sampling warpers on ``scores [N, V]``: temperature, then top-k, then top-p.

    Tokens that may not be drawn get -inf. Top-k keeps every token scoring at least the
    k-th best (ties included); top-p keeps the most likely tokens until their probability
    reaches ``top_p`` (the token that crosses it included, the most likely one always).
    """
    check_sampling(temperature, top_k, top_p)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(scores, dim=-1)
        # Drop the least likely tokens while what they add up to stays within 1 - top_p.
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1.0 - top_p
        drop[:, -1] = False
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return scores


class _Sampler:
    """One multinomial draw per row from the warped scores, taken on TP rank 0."""

    def __init__(self, temperature: float, top_k: int, top_p: float, generator: torch.Generator | None):
        check_sampling(temperature, top_k, top_p)
        self.options = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = generator

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        probs = sampling_scores(scores, **self.options).softmax(dim=-1)
        tokens = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        return _from_tp_rank0(tokens)


class _StepModel:
    """Runs the model one step at a time with a KV cache; returns full-vocabulary logits.

    The cache is allocated once for the prompt and every new token (``max_new_tokens``), so
    a step writes one position instead of copying all before it.
    """

    def __init__(self, model: ParallelCausalLM, attention_mask: torch.Tensor, max_new_tokens: int):
        if not (model.pre_process and model.post_process and model.layer_range == (0, model.cfg.num_layers)):
            raise ValueError("generation needs the whole LLM on one pipeline stage (pp=1)")
        self.model = model
        self.cache = KVCache(max_length=attention_mask.shape[1] + max_new_tokens)
        self.attention_mask = attention_mask
        # As HF's generate: positions count real tokens, padding gets 0 (it is never attended).
        positions = attention_mask.long().cumsum(-1) - 1
        self.position_ids = positions.masked_fill(attention_mask == 0, 0)

    def _full_vocab_logits(self, logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].contiguous()  # [B, V / tp]
        full = gather_from_tp_ranks(last, dim=-1)
        return full[:, : self.model.vocab_size].float()

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            kv_cache=self.cache,
            logits_to_keep=1,
        )
        self.position_ids = self.position_ids[:, -1:]
        return self._full_vocab_logits(out.logits)

    def select(self, batch_index: torch.Tensor, shared: int = 0) -> None:
        """Re-order / duplicate batch rows of the cache and the running mask and positions.

        ``shared``: cached positions every row already shares with the row it is taken from
        (beam search: the prompt, duplicated once), which the cache then leaves in place.
        """
        self.cache.select(batch_index, start=shared)
        self.attention_mask = self.attention_mask.index_select(0, batch_index)
        self.position_ids = self.position_ids.index_select(0, batch_index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones(tokens.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        self.position_ids = self.position_ids + 1
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            kv_cache=self.cache,
            logits_to_keep=1,
        )
        return self._full_vocab_logits(out.logits)


class _Seq2SeqStepModel(_StepModel):
    """An encoder-decoder (T5) one step at a time: the encoder runs once, in :meth:`prefill`,
    with the decoder's start token; each decoder layer keeps its cross-attention keys and
    values of the encoder's output in the cache, so later steps read neither the encoder's
    output nor its projections again. Beam search duplicates them with the rest of the cache."""

    def __init__(self, model: ParallelT5, attention_mask: torch.Tensor, max_new_tokens: int):
        self.model = model
        self.cache = Seq2SeqCache()
        self.cache.max_length = max_new_tokens + 1  # the decoder's own positions: start token + new ones
        self.attention_mask = attention_mask  # the encoder's: what cross-attention may read

    def prefill(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        encoder_states = self.model.encode(inputs_embeds=inputs_embeds, attention_mask=self.attention_mask)
        start = self.attention_mask.new_full((inputs_embeds.shape[0], 1), self.model.cfg.pad_token_id)
        logits = self.model.decode(start, encoder_states, self.attention_mask, self.cache, logits_to_keep=1)
        return self._full_vocab_logits(logits)

    def select(self, batch_index: torch.Tensor, shared: int = 0) -> None:
        self.cache.select(batch_index)  # the decoder's cache holds generated positions only
        self.attention_mask = self.attention_mask.index_select(0, batch_index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.model.decode(tokens[:, None], None, self.attention_mask, self.cache, logits_to_keep=1)
        return self._full_vocab_logits(logits)


def _process_scores(
    scores: torch.Tensor,
    generated: torch.Tensor,
    eos: torch.Tensor,
    min_new_tokens: int,
    repetition_penalty: float,
) -> torch.Tensor:
    """HF's repetition penalty and min-new-tokens processors on ``scores [N, V]``."""
    if repetition_penalty != 1.0 and generated.shape[1] > 0:
        seen = torch.gather(scores, 1, generated)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        scores = scores.scatter(1, generated, seen)
    if generated.shape[1] < min_new_tokens and eos.numel():
        scores = scores.clone()
        scores[:, eos] = float("-inf")
    return scores


@torch.no_grad()
def generate(
    model: ParallelCausalLM | ParallelT5,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int = 1,
    max_new_tokens: int = 20,
    min_new_tokens: int = 0,
    length_penalty: float = 1.0,
    repetition_penalty: float = 1.0,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    early_stopping: bool | str = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    streamer: Callable[[torch.Tensor], bool | None] | None = None,
) -> torch.Tensor:
    """Generate continuations of ``inputs_embeds [B, T, H]`` (left-padded, ``attention_mask [B, T]``).

    Returns the new token ids only, ``[B * num_return_sequences, L]`` with
    ``L <= max_new_tokens``, rows of one input adjacent (best beam first), padded with
    ``pad_token_id`` after a row's end token. ``eos_token_id`` / ``pad_token_id`` default to
    the model config's. Collective over the TP group: every TP rank calls it with the same
    inputs and gets the same result.

    ``do_sample`` draws each token (``num_beams=1``) after ``temperature`` / ``top_k`` (0 =
    off) / ``top_p`` (1 = off), from ``generator`` (the global one if None; seed it for
    reproducible samples). ``stop_sequences`` and ``streamer``: see the module docstring.
    """
    cfg = model.cfg
    if eos_token_id is None:
        eos_token_id = cfg.eos_token_id
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if num_beams < 1 or num_return_sequences < 1 or (num_return_sequences > num_beams and not do_sample):
        raise ValueError(
            f"need num_beams >= 1 and 1 <= num_return_sequences <= num_beams (or sampling) "
            f"(got num_beams={num_beams}, num_return_sequences={num_return_sequences})"
        )
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r} must be True, False or 'never'")
    if num_beams > 1 and (do_sample or streamer is not None):
        raise ValueError(
            f"num_beams={num_beams}: beam search neither samples nor streams (beams are re-ordered at "
            "every step); use num_beams=1 for do_sample=True or a streamer"
        )
    sampler = _Sampler(temperature, top_k, top_p, generator) if do_sample else None
    if sampler is not None and num_return_sequences > 1:
        # As HF: each input is repeated and every copy draws its own continuation.
        inputs_embeds = inputs_embeds.repeat_interleave(num_return_sequences, dim=0)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat_interleave(num_return_sequences, dim=0)
    if attention_mask is None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
    if attention_mask.shape[1] + max_new_tokens > cfg.max_position_embeddings:
        logger.warning(
            "prompt (%d) + max_new_tokens (%d) exceeds max_position_embeddings (%d)",
            attention_mask.shape[1],
            max_new_tokens,
            cfg.max_position_embeddings,
        )
    was_training = model.training
    model.eval()
    try:
        stepper_class = _Seq2SeqStepModel if cfg.is_encoder_decoder else _StepModel
        stepper = stepper_class(model, attention_mask, max_new_tokens)
        eos = _eos_tensor(eos_token_id, inputs_embeds.device)
        common = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            repetition_penalty=repetition_penalty,
            eos=eos,
            stop=_StopSequences(stop_sequences, inputs_embeds.device),
            pad_token_id=pad_token_id,
        )
        if num_beams == 1:
            return _greedy(stepper, inputs_embeds, sampler=sampler, streamer=streamer, **common)
        return _beam_search(
            stepper,
            inputs_embeds,
            num_beams=num_beams,
            num_return_sequences=num_return_sequences,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            **common,
        )
    finally:
        model.train(was_training)


def _greedy(
    stepper: _StepModel,
    inputs_embeds: torch.Tensor,
    *,
    sampler: _Sampler | None,
    streamer: Callable[[torch.Tensor], bool | None] | None,
    max_new_tokens: int,
    min_new_tokens: int,
    repetition_penalty: float,
    eos: torch.Tensor,
    stop: _StopSequences,
    pad_token_id: int,
) -> torch.Tensor:
    """Greedy search, or sampling with ``sampler``: one token per row and step."""
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    generated = torch.empty(batch, 0, dtype=torch.long, device=device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    logits = stepper.prefill(inputs_embeds)
    for step in range(max_new_tokens):
        scores = _process_scores(logits, generated, eos, min_new_tokens, repetition_penalty)
        tokens = scores.argmax(dim=-1) if sampler is None else sampler(scores)
        tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad_token_id))
        generated = torch.cat([generated, tokens[:, None]], dim=1)
        unfinished &= ~(torch.isin(tokens, eos) | stop.hit(generated))
        stop_requested = False
        if streamer is not None:
            request = torch.tensor([int(bool(streamer(tokens)))], device=device)
            stop_requested = bool(_from_tp_rank0(request))
        if stop_requested or not unfinished.any() or step + 1 == max_new_tokens:
            break
        logits = stepper.step(tokens)
    return generated


def _beam_search(
    stepper: _StepModel,
    inputs_embeds: torch.Tensor,
    *,
    num_beams: int,
    num_return_sequences: int,
    length_penalty: float,
    early_stopping: bool | str,
    max_new_tokens: int,
    min_new_tokens: int,
    repetition_penalty: float,
    eos: torch.Tensor,
    stop: _StopSequences,
    pad_token_id: int,
) -> torch.Tensor:
    batch = inputs_embeds.shape[0]
    device = inputs_embeds.device
    beams = num_beams
    # Enough candidates that `beams` of them can continue even if the best ones all end.
    candidates = max(2, 1 + eos.numel()) * beams
    is_top_beam = torch.arange(candidates, device=device) < beams

    # Running hypotheses: tokens so far and cumulative log-probs. Only beam 0 starts live, so
    # the first step does not pick the same token `beams` times.
    running = torch.full((batch, beams, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    running_scores = torch.zeros(batch, beams, device=device)
    running_scores[:, 1:] = _NEG
    # Finished hypotheses (the best `beams` per input), their length-normalised scores and lengths.
    finished = running.clone()
    finished_scores = torch.full((batch, beams), _NEG, device=device)
    finished_len = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    can_improve = torch.ones(batch, 1, dtype=torch.bool, device=device)

    # The prompt runs once per input; the cache is then duplicated for the beams.
    logits = stepper.prefill(inputs_embeds)
    expand = torch.arange(batch, device=device).repeat_interleave(beams)
    stepper.select(expand)
    prompt_length = stepper.cache.seq_length  # equal in every beam of an input from here on
    logits = logits.index_select(0, expand)
    vocab = logits.shape[-1]
    batch_offset = torch.arange(batch, device=device)[:, None] * beams

    for cur_len in range(max_new_tokens):
        log_probs = F.log_softmax(logits, dim=-1)
        log_probs = _process_scores(
            log_probs,
            running[:, :, :cur_len].reshape(batch * beams, cur_len),
            eos,
            min_new_tokens,
            repetition_penalty,
        )
        total = (log_probs.view(batch, beams, vocab) + running_scores[:, :, None]).view(batch, beams * vocab)
        top_scores, top_index = torch.topk(total, candidates)
        source_beam = top_index // vocab
        tokens = top_index % vocab
        top_seqs = torch.take_along_dim(running, source_beam[:, :, None], dim=1)
        top_seqs[:, :, cur_len] = tokens
        ends = (
            torch.isin(tokens, eos)
            | stop.hit(top_seqs[:, :, : cur_len + 1])
            | (cur_len + 1 >= max_new_tokens)
        )

        # The best `beams` candidates that did not end keep running.
        live_scores = top_scores + ends.float() * _NEG
        keep = torch.topk(live_scores, beams).indices
        running = torch.take_along_dim(top_seqs, keep[:, :, None], dim=1)
        running_scores = torch.take_along_dim(live_scores, keep, dim=1)
        running_source = torch.take_along_dim(source_beam, keep, dim=1)

        # Candidates among the top `beams` that ended compete for the finished slots.
        just_ended = ends & is_top_beam[None]
        scores = top_scores / float(cur_len + 1) ** length_penalty
        all_done = is_finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        scores = (
            scores + all_done.float() * _NEG + (~can_improve).float() * _NEG + (~just_ended).float() * _NEG
        )
        merged_scores = torch.cat([finished_scores, scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        finished = torch.take_along_dim(torch.cat([finished, top_seqs], dim=1), best[:, :, None], dim=1)
        finished_scores = torch.take_along_dim(merged_scores, best, dim=1)
        new_len = torch.full_like(tokens, cur_len + 1)
        finished_len = torch.take_along_dim(torch.cat([finished_len, new_len], dim=1), best, dim=1)
        is_finished = torch.take_along_dim(torch.cat([is_finished, just_ended], dim=1), best, dim=1)

        # Could a running beam still beat the worst finished one? (HF's heuristic, see module doc.)
        length = max_new_tokens if (early_stopping == "never" and length_penalty > 0.0) else cur_len + 1
        best_running = running_scores[:, :1] / float(length) ** length_penalty
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, _NEG)
        can_improve = can_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
        if cur_len + 1 == max_new_tokens:
            break
        search_over = ~can_improve.any() | ends.all()
        if early_stopping is True:
            search_over |= is_finished.all()
        if bool(search_over):  # the one host sync of a step: whether any input still needs beams
            break
        stepper.select((running_source + batch_offset).view(-1), shared=prompt_length)
        logits = stepper.step(running[:, :, cur_len].reshape(-1))

    best = finished[:, :num_return_sequences].reshape(batch * num_return_sequences, max_new_tokens)
    length = int(finished_len[:, :num_return_sequences].max())
    return best[:, :length]
