"""Tensor-parallel T5 v1.1 / FlanT5: the encoder-decoder LLM of BLIP-2 FlanT5.

Written from the same megatron-core primitives and pieces as the decoder-only models of
``models/llm.py`` (column / row-parallel linears, the vocab-parallel embedding, head and
cross entropy, the RMS norm, the gated FFN); megatron-core's own T5 model takes its
relative position bias only through Transformer Engine, which needs a GPU.

T5 as transformers computes it (``T5ForConditionalGeneration``, the v1.1 / FlanT5 settings):

* one stack class for the encoder and the decoder (:class:`T5Stack`); a decoder layer adds
  cross-attention over the encoder's output between self-attention and the FFN;
* pre-norm residual blocks with T5's norm (``x * rsqrt(mean(x^2) + eps) * weight``, in
  fp32, no mean, no bias) and a final norm per stack;
* attention without the ``1/sqrt(d)`` scaling of the scores (T5 folds it into the
  initialisation) and an additive relative position bias computed by the stack's first
  layer and shared by all its layers: ``relative_attention_num_buckets`` buckets of the
  key-minus-query distance, half of them exact and the rest log-spaced up to
  ``relative_attention_max_distance``; bidirectional (half the buckets per direction) in
  the encoder, looking back only (causal) in the decoder, where a cached decoding step
  measures its distance from its real position;
* gated GELU FFN (``wi_0`` gated, ``wi_1`` linear, ``wo``), activation as the config names it;
* one token embedding for encoder and decoder inputs, an untied head without output scaling;
* the decoder starts from ``pad_token_id`` (T5's decoder start token) and is fed the
  labels shifted right.

Dropout is not modelled: BLIP-2 keeps the LLM frozen, and our decoder-only LLMs do not
model theirs either.

Tensor parallelism: q/k/v and ``wi_0`` / ``wi_1`` are split by output rows (whole heads per
rank), ``o`` and ``wo`` by input columns, the embedding and the head by vocabulary rows,
and the relative bias table ``[buckets, heads]`` by heads (dim 1): each rank computes the
bias of its own heads, without communication. Pipeline parallelism is refused by the
config (every decoder layer reads the encoder's output).

Module layout (transformers' names in ``convert/hf_llm.py``)::

    embed_tokens                      VocabParallelEmbedding   (shared)
    encoder.layers[i]                 T5Layer
      .input_layernorm, .self_attn.{q,k,v,o}_proj (+ .relative_attention_bias in layer 0),
      .post_attention_layernorm, .mlp.{gate_proj,up_proj,down_proj}
    encoder.norm                      RMSNorm
    decoder.layers[i]                 T5Layer, plus .cross_attention_layernorm, .cross_attn.{q,k,v,o}_proj
    decoder.norm                      RMSNorm
    lm_head                           ColumnParallelLinear, vocab-parallel
"""

from __future__ import annotations

import math

import torch
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2_megatron import accelerator
from blip2_megatron.config import LLMConfig
from blip2_megatron.data.batch import IGNORE_INDEX
from blip2_megatron.models.llm import (
    INIT_STD,
    ColumnParallelLinear,
    GatedMLP,
    KVCache,
    LMOutput,
    RMSNorm,
    RowParallelLinear,
    mark_partitioned_weights,
    normal_init,
    padded_vocab_size,
    token_cross_entropy,
    vocab_parallel_logits,
)
from blip2_megatron.parallel import state


def relative_position_buckets(
    relative_position: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of each ``key - query`` distance.

    Bidirectional (encoder): half the buckets for keys after the query, half for keys at or
    before it. Causal (decoder): keys after the query fall into bucket 0 with the query
    itself (the causal mask hides them anyway). Within a direction, distances below half
    the buckets get one bucket each; longer ones share log-spaced buckets up to
    ``max_distance``, beyond which everything is in the last bucket.
    """
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = num_buckets // 2
    # log(distance / exact) is -inf at 0 and negative below `exact`: those distances take the exact branch.
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    """T5 self- or cross-attention: unscaled scores plus an additive bias (positions and masks)."""

    def __init__(
        self,
        cfg: LLMConfig,
        mp_config: ModelParallelConfig,
        has_relative_bias: bool = False,
        is_cross: bool = False,
    ):
        super().__init__()
        self.is_cross = is_cross
        tp = mp_config.tensor_model_parallel_size
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp
        init = normal_init(INIT_STD)
        column = dict(config=mp_config, init_method=init, bias=False, gather_output=False)
        self.q_proj = ColumnParallelLinear(cfg.hidden_size, cfg.attention_width, **column)
        self.k_proj = ColumnParallelLinear(cfg.hidden_size, cfg.attention_width, **column)
        self.v_proj = ColumnParallelLinear(cfg.hidden_size, cfg.attention_width, **column)
        self.o_proj = RowParallelLinear(
            cfg.attention_width,
            cfg.hidden_size,
            config=mp_config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )
        if has_relative_bias:
            # This rank's heads' columns of the [buckets, heads] table.
            # Created without drawing (ParallelT5 draws the whole table, so every TP layout starts equal).
            table = torch.empty(
                cfg.relative_attention_num_buckets, self.num_heads, dtype=mp_config.params_dtype
            )
            self.relative_attention_bias = nn.Embedding(*table.shape, _weight=table)
            tensor_parallel.set_tensor_model_parallel_attributes(
                self.relative_attention_bias.weight, is_parallel=True, dim=1, stride=1
            )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[:2]
        return x.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        bias: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        cache: KVCache | None = None,
        cache_index: int = 0,
    ) -> torch.Tensor:
        """``bias [B or 1, heads, T, keys]`` is added to the scores (``-inf``-like where masked).

        Self-attention: keys and values from ``hidden_states``, appended to ``cache``.
        Cross-attention: keys and values of ``key_value_states`` (the encoder's output),
        computed once and kept in ``cache`` (a :class:`Seq2SeqCache`'s ``cross``), from
        which every later decoding step reads them (``key_value_states`` may then be None).
        """
        batch, seq = hidden_states.shape[:2]
        query = self._heads(self.q_proj(hidden_states)[0])
        if not self.is_cross:
            key = self._heads(self.k_proj(hidden_states)[0])
            value = self._heads(self.v_proj(hidden_states)[0])
            if cache is not None:
                key, value = cache.update(cache_index, key, value)
        elif cache is not None and cache_index < len(cache.layers):
            key, value = cache.layers[cache_index]
        else:
            if key_value_states is None:
                raise ValueError("cross-attention needs the encoder's output (none given, none cached)")
            key = self._heads(self.k_proj(key_value_states)[0])
            value = self._heads(self.v_proj(key_value_states)[0])
            if cache is not None:
                cache.update(cache_index, key, value)
        out = accelerator.attention_function(self.head_dim)(
            query, key, value, attn_mask=bias.to(query.dtype), scale=1.0
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)[0]


class T5Layer(nn.Module):
    """One T5 block: self-attention, cross-attention (decoder only), gated FFN, each pre-normed."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig, index: int, is_decoder: bool):
        super().__init__()
        dtype = mp_config.params_dtype
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.is_decoder = is_decoder
        self.self_attn = T5Attention(cfg, mp_config, has_relative_bias=index == 0)
        if is_decoder:
            self.cross_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
            self.cross_attn = T5Attention(cfg, mp_config, is_cross=True)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)
        self.mlp = GatedMLP(cfg, mp_config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_bias: torch.Tensor,
        encoder_states: torch.Tensor | None = None,
        cross_bias: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), self_bias, cache=cache, cache_index=index
        )
        if self.is_decoder:
            hidden_states = hidden_states + self.cross_attn(
                self.cross_attention_layernorm(hidden_states),
                cross_bias,
                key_value_states=encoder_states,
                cache=cache.cross if cache is not None else None,
                cache_index=index,
            )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class Seq2SeqCache(KVCache):
    """The decoder's self-attention keys and values (as :class:`KVCache`) and, in ``cross``,
    each layer's cross-attention keys and values of the encoder's output (computed once)."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = KVCache()

    def select(self, batch_index: torch.Tensor) -> None:
        super().select(batch_index)
        self.cross.select(batch_index)


def padding_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``[B, 1, 1, keys]``: 0 where a key is real, the dtype's lowest value where it is padding."""
    if attention_mask is None:
        return None
    hidden = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return hidden.masked_fill(attention_mask == 0, torch.finfo(dtype).min)[:, None, None, :]


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, cross-attending) of T5."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig, is_decoder: bool):
        super().__init__()
        self.cfg = cfg
        self.is_decoder = is_decoder
        num_layers = cfg.decoder_layers if is_decoder else cfg.num_layers
        self.layers = nn.ModuleList(T5Layer(cfg, mp_config, i, is_decoder) for i in range(num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, mp_config.params_dtype)
        self.grad_checkpointing = cfg.grad_checkpointing

    def position_bias(self, query_len: int, past_length: int, device, dtype: torch.dtype) -> torch.Tensor:
        """``[1, local heads, query_len, past + query_len]`` from the first layer's table
        (and, in the decoder, the causal mask); queries sit at ``past .. past + query_len``."""
        key_len = past_length + query_len
        query_pos = torch.arange(past_length, key_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_buckets(
            key_pos - query_pos,
            bidirectional=not self.is_decoder,
            num_buckets=self.cfg.relative_attention_num_buckets,
            max_distance=self.cfg.relative_attention_max_distance,
        )
        bias = self.layers[0].self_attn.relative_attention_bias(buckets).to(dtype)  # [q, k, heads]
        bias = bias.permute(2, 0, 1)[None]
        if self.is_decoder:
            bias = bias.masked_fill(key_pos > query_pos, torch.finfo(dtype).min)
        return bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
    ) -> torch.Tensor:
        """Embedded inputs ``[B, T, H]`` -> normalised outputs.

        ``attention_mask`` ``[B, T]`` masks padded keys of the encoder; the decoder's own
        inputs are never padded before a real token (its mask is causal). ``encoder_mask``
        masks padded encoder positions in the decoder's cross-attention. A decoding step
        whose ``cache`` holds the cross-attention keys and values needs no ``encoder_states``.
        """
        past_length = cache.seq_length if cache is not None else 0
        dtype = hidden_states.dtype
        self_bias = self.position_bias(hidden_states.shape[1], past_length, hidden_states.device, dtype)
        if not self.is_decoder and attention_mask is not None:
            self_bias = self_bias + padding_bias(attention_mask, dtype)
        cross_bias = None
        if self.is_decoder:
            cross_bias = padding_bias(encoder_mask, dtype)
            if cross_bias is None:  # every encoder position is real
                cross_bias = torch.zeros(1, 1, 1, 1, dtype=dtype, device=hidden_states.device)
        use_checkpointing = (
            self.grad_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        )
        for index, layer in enumerate(self.layers):
            args = (hidden_states, self_bias, encoder_states, cross_bias)
            if use_checkpointing:
                hidden_states = checkpoint(layer, *args, None, index, use_reentrant=False)
            else:
                hidden_states = layer(*args, cache, index)
        return self.norm(hidden_states)


def shift_right(labels: torch.Tensor, start_token_id: int) -> torch.Tensor:
    """Decoder inputs from labels: the start token, then the labels but the last; -100 -> start (pad)."""
    inputs = torch.full_like(labels, start_token_id)
    inputs[:, 1:] = labels[:, :-1]
    return inputs.masked_fill(inputs == IGNORE_INDEX, start_token_id)


class ParallelT5(nn.Module):
    """T5 v1.1 / FlanT5 split over TP ranks (no pipeline stages: see the module docstring).

    The interface follows :class:`~blip2_megatron.models.llm.ParallelCausalLM` where the
    meaning carries over (``get_input_embeddings``, ``compute_logits``, ``forward`` returning
    an :class:`LMOutput`), so BLIP-2, the engine and generation treat both alike; what is new
    is the encoder's output (:meth:`encode`) that the decoder reads.

    Args: as ``ParallelCausalLM``'s ``cfg``, ``params_dtype`` and ``init_weights``.
    """

    is_encoder_decoder = True
    pre_process = post_process = True  # the whole model, always

    def __init__(
        self, cfg: LLMConfig, params_dtype: torch.dtype = torch.float32, *, init_weights: bool | None = None
    ):
        super().__init__()
        if not state.is_initialized():
            raise RuntimeError(
                "model-parallel groups are not initialised: call "
                "blip2_megatron.parallel.state.initialize_model_parallel(tp, pp) before building the LLM"
            )
        tp = state.tp_size()
        if cfg.tp != tp:
            raise ValueError(f"llm.tp={cfg.tp} but the running tensor-parallel group has {tp} ranks")
        if not cfg.is_encoder_decoder:
            raise ValueError(f"ParallelT5 needs llm.arch='t5', not {cfg.arch!r}")
        self.cfg = cfg
        self.layer_range = (0, cfg.num_layers)
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, tp)
        self.tie_word_embeddings = False
        self.holds_tied_head_copy = False
        if init_weights is None:
            init_weights = not cfg.weights
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            use_cpu_initialization=True,
            perform_initialization=init_weights,
            params_dtype=params_dtype,
        )
        self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
            self.padded_vocab_size, cfg.hidden_size, init_method=normal_init(INIT_STD), config=mp_config
        )
        self.encoder = T5Stack(cfg, mp_config, is_decoder=False)
        self.decoder = T5Stack(cfg, mp_config, is_decoder=True)
        self.lm_head = ColumnParallelLinear(
            cfg.hidden_size,
            self.padded_vocab_size,
            config=mp_config,
            init_method=normal_init(INIT_STD),
            bias=False,
            gather_output=False,
        )
        mark_partitioned_weights(self)
        if init_weights:
            self._init_non_parallel_weights()

    @torch.no_grad()
    def _init_non_parallel_weights(self) -> None:
        """Random relative bias tables, and zero rows for the vocabulary padding.

        Each table is drawn whole and this rank keeps its heads' columns, as megatron-core's
        CPU initialisation does for split weights: any TP size starts from the same model.
        """
        rank = state.tp_rank()
        for stack in (self.encoder, self.decoder):
            local = stack.layers[0].self_attn.relative_attention_bias.weight
            heads = local.shape[1]
            whole = torch.empty(local.shape[0], heads * self.cfg.tp, dtype=local.dtype, device=local.device)
            local.copy_(nn.init.normal_(whole, std=INIT_STD)[:, rank * heads : (rank + 1) * heads])
        local_rows = self.padded_vocab_size // self.cfg.tp
        first_padding = max(self.vocab_size - state.tp_rank() * local_rows, 0)
        if first_padding < local_rows:
            self.embed_tokens.weight[first_padding:] = 0.0
            self.lm_head.weight[first_padding:] = 0.0

    def get_input_embeddings(self) -> nn.Module:
        """The vocab-parallel token embedding shared by encoder and decoder inputs."""
        return self.embed_tokens

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Decoder outputs -> this rank's vocab-parallel logits, padded columns at ``-inf``."""
        return vocab_parallel_logits(self.lm_head, hidden_states, self.vocab_size)

    def encode(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The encoder's output ``[B, T, H]`` (BLIP-2: image slots, prompt, ``</s>``)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return self.encoder(inputs_embeds, attention_mask)

    def decode(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_states: torch.Tensor | None,
        encoder_mask: torch.Tensor | None = None,
        cache: Seq2SeqCache | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Vocab-parallel logits of the decoder over ``decoder_input_ids [B, T]`` (after ``cache``;
        ``encoder_states`` may be None once the cache holds the cross-attention keys and values)."""
        hidden = self.decoder(self.embed_tokens(decoder_input_ids), None, encoder_states, encoder_mask, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.compute_logits(hidden)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        encoder_states: torch.Tensor | None = None,
        kv_cache: Seq2SeqCache | None = None,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Encoder (unless ``encoder_states`` are given) and decoder; loss over ``labels``.

        Args:
            input_ids / inputs_embeds: the encoder's input ``[B, T]`` / ``[B, T, H]``.
            attention_mask: ``[B, T]`` 1 for real encoder positions, 0 for padding.
            labels: ``[B, L]`` decoder targets, -100 where no loss is taken; the decoder
                reads them shifted right (:func:`shift_right`) unless ``decoder_input_ids``
                are given. The loss is the mean cross entropy over labels != -100.
            decoder_input_ids: ``[B, L]`` explicit decoder inputs.
            encoder_states: a previous :meth:`encode` of the same inputs (generation).
            kv_cache / logits_to_keep: as in ``ParallelCausalLM.forward``.
        """
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("the decoder needs decoder_input_ids or labels")
            decoder_input_ids = shift_right(labels, self.cfg.pad_token_id)
        if encoder_states is None:
            encoder_states = self.encode(input_ids, inputs_embeds, attention_mask)
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position")
        logits = self.decode(decoder_input_ids, encoder_states, attention_mask, kv_cache, logits_to_keep)
        loss = token_cross_entropy(logits, labels) if labels is not None else None
        return LMOutput(logits=logits, loss=loss, hidden_states=encoder_states, kv_cache=kv_cache)
