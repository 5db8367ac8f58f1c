"""The Q-Former: a BERT encoder whose learned queries read the image through cross-attention.

Parameter names are those of Hugging Face ``Blip2QFormerModel`` (``layernorm``,
``encoder.layer.{i}.attention.attention.query`` ..., ``crossattention.*``,
``intermediate`` / ``output`` for the text FFN, ``intermediate_query`` /
``output_query`` for the query FFN) plus ``embeddings.word_embeddings`` /
``embeddings.position_embeddings`` (HF keeps these as ``Blip2TextEmbeddings`` outside the
Q-Former, LAVIS inside ``Qformer.bert.embeddings``). ``layernorm`` is BERT's embedding
LayerNorm: it normalises the concatenation ``[queries, text]``. The learned query tokens
themselves belong to the caller (:class:`~blip2_megatron.models.query_encoder.QueryEncoder`),
where Hugging Face keeps them.

Four ways to run it, all over the same layers (self-attention over whatever sequence is
given; only query positions cross-attend to the image and use the query FFN; text
positions use the text FFN):

(a) :meth:`QFormer.forward` - queries only (ITC image side, stage 2); can return the
    per-layer self-attention keys/values of the queries for (d);
(b) :meth:`QFormer.encode_text` - text only, padding masked (ITC text side);
(c) :meth:`QFormer.encode_query_text` - ``[queries, text]`` attending to each other in full
    (ITM);
(d) :meth:`QFormer.decode_text` - text attending to all queries (their cached keys/values
    from (a)) and causally to earlier text, no cross-attention (ITG).

A Q-Former built with ``with_text=False`` (stage 2: HF ``use_qformer_text_input=False``)
has no text embeddings and no text FFN and supports only (a).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2_megatron import accelerator
from blip2_megatron.config import QFormerConfig
from blip2_megatron.models import cpu_linear

logger = logging.getLogger(__name__)

KeyValue = tuple[torch.Tensor, torch.Tensor]


@dataclass
class QFormerOutput:
    """Hidden states of the last layer, and optionally each layer's self-attention keys/values."""

    last_hidden_state: torch.Tensor  # [B, L, H]
    key_values: list[KeyValue] | None = None  # per layer ([B, heads, L, head_dim], same for values)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` 1/0 mask -> boolean SDPA mask ``[B, 1, 1, L]`` (True = may be attended to)."""
    return attention_mask.bool()[:, None, None, :]


def causal_text_mask(text_attention_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """Mask for text that sees ``num_prefix`` prefix positions fully and earlier text causally.

    Returns ``[B, 1, T, num_prefix + T]`` booleans; padded text keys are masked.
    """
    batch, length = text_attention_mask.shape
    device = text_attention_mask.device
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    prefix = torch.ones(length, num_prefix, dtype=torch.bool, device=device)
    allowed = torch.cat([prefix, causal], dim=1)[None, None]  # [1, 1, T, P + T]
    keys = torch.cat(
        [torch.ones(batch, num_prefix, dtype=torch.bool, device=device), text_attention_mask.bool()], dim=1
    )
    return allowed & keys[:, None, None, :]


class QFormerTextEmbeddings(nn.Module):
    """Word + learned absolute position embeddings (HF ``Blip2TextEmbeddings`` names)."""

    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.register_buffer(
            "position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_ids.shape[1]:
            raise ValueError(
                f"text of {length} tokens exceeds qformer.max_position_embeddings={self.position_ids.shape[1]}"
            )
        return self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, :length])


class QFormerMultiHeadAttention(nn.Module):
    """Query/key/value projections and SDPA (HF ``Blip2QFormerMultiHeadAttention`` names)."""

    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.dropout_prob = cfg.attention_dropout_prob
        kv_width = cfg.encoder_hidden_size if is_cross_attention else cfg.hidden_size
        self.query = cpu_linear.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = cpu_linear.Linear(kv_width, cfg.hidden_size)
        self.value = cpu_linear.Linear(kv_width, cfg.hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:2], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        kv_states: torch.Tensor | None = None,
        past_key_value: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        """Attend from ``hidden_states`` to ``kv_states`` (default: itself) after ``past_key_value``.

        Returns the context ``[B, L, H]`` and this call's own keys/values (without the past),
        which is what a later pass needs to attend to these positions.
        """
        source = hidden_states if kv_states is None else kv_states.to(self.key.weight.dtype)
        query = self._heads(self.query(hidden_states))
        key, value = self._heads(self.key(source)), self._heads(self.value(source))
        present = (key, value)
        if past_key_value is not None:
            key = torch.cat([past_key_value[0], key], dim=2)
            value = torch.cat([past_key_value[1], value], dim=2)
        context = accelerator.attention_function(self.head_dim)(
            query, key, value, attn_mask=mask, dropout_p=self.dropout_prob if self.training else 0.0
        )
        return context.transpose(1, 2).flatten(2), present


class QFormerSelfOutput(nn.Module):
    """Output projection, dropout, residual and post-LayerNorm (BERT)."""

    def __init__(self, cfg: QFormerConfig, in_features: int):
        super().__init__()
        self.dense = cpu_linear.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class QFormerAttention(nn.Module):
    """Self- or cross-attention block: ``attention`` (q/k/v) + ``output`` (dense, LayerNorm)."""

    def __init__(self, cfg: QFormerConfig, is_cross_attention: bool = False):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(cfg, is_cross_attention)
        self.output = QFormerSelfOutput(cfg, cfg.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        kv_states: torch.Tensor | None = None,
        past_key_value: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        context, present = self.attention(hidden_states, mask, kv_states, past_key_value)
        return self.output(context, hidden_states), present


class QFormerIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = cpu_linear.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


class QFormerLayer(nn.Module):
    """Self-attention, cross-attention for query positions (some layers), separate query/text FFNs."""

    def __init__(self, cfg: QFormerConfig, layer_idx: int, with_text: bool):
        super().__init__()
        self.attention = QFormerAttention(cfg)
        self.has_cross_attention = cfg.has_cross_attention(layer_idx)
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(cfg, is_cross_attention=True)
        if with_text:
            self.intermediate = QFormerIntermediate(cfg)
            self.output = QFormerSelfOutput(cfg, cfg.intermediate_size)
        self.intermediate_query = QFormerIntermediate(cfg)
        self.output_query = QFormerSelfOutput(cfg, cfg.intermediate_size)

    def _text_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.intermediate(x), x)

    def _query_ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_query(self.intermediate_query(x), x)

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        query_length: int,
        encoder_hidden_states: torch.Tensor | None,
        encoder_mask: torch.Tensor | None,
        past_key_value: KeyValue | None = None,
    ) -> tuple[torch.Tensor, KeyValue]:
        attended, present = self.attention(hidden_states, self_mask, past_key_value=past_key_value)
        if query_length == 0:
            return self._text_ffn(attended), present
        queries = attended[:, :query_length]
        if self.has_cross_attention:
            if encoder_hidden_states is None:
                raise ValueError(
                    "query positions need encoder_hidden_states (image features) for cross-attention"
                )
            queries, _ = self.crossattention(queries, encoder_mask, kv_states=encoder_hidden_states)
        out = self._query_ffn(queries)
        if attended.shape[1] > query_length:
            out = torch.cat([out, self._text_ffn(attended[:, query_length:])], dim=1)
        return out, present


class QFormerEncoder(nn.Module):
    """The layer stack (``encoder.layer.{i}``), optionally with activation checkpointing per layer."""

    def __init__(self, cfg: QFormerConfig, with_text: bool):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i, with_text) for i in range(cfg.num_layers))
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(
        self,
        hidden_states: torch.Tensor,
        self_mask: torch.Tensor | None,
        query_length: int,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_mask: torch.Tensor | None = None,
        past_key_values: list[KeyValue] | None = None,
        return_key_values: bool = False,
    ) -> QFormerOutput:
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        presents: list[KeyValue] = []
        for i, layer in enumerate(self.layer):
            args = (
                hidden_states,
                self_mask,
                query_length,
                encoder_hidden_states,
                encoder_mask,
                None if past_key_values is None else past_key_values[i],
            )
            hidden_states, present = (
                checkpoint(layer, *args, use_reentrant=False) if use_checkpoint else layer(*args)
            )
            presents.append(present)
        return QFormerOutput(hidden_states, presents if return_key_values else None)


class QFormer(nn.Module):
    """BLIP-2's Q-Former (see the module docstring for the four attention modes)."""

    def __init__(self, cfg: QFormerConfig, with_text: bool = True):
        super().__init__()
        self.cfg = cfg
        self.with_text = with_text
        self.embeddings = QFormerTextEmbeddings(cfg) if with_text else None
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)
        self.encoder = QFormerEncoder(cfg, with_text)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """BERT's initialisation (normal ``initializer_range``, zero biases, unit LayerNorms); query FFN = text FFN.

        LAVIS starts the query FFN as a copy of the (pretrained) text FFN; the same copy is
        made here so that loading BERT weights and calling :meth:`copy_text_ffn_to_query_ffn`
        reproduces it.
        """
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.embeddings is not None:
            self.embeddings.word_embeddings.weight[self.cfg.pad_token_id].zero_()
        self.copy_text_ffn_to_query_ffn()

    @torch.no_grad()
    def copy_text_ffn_to_query_ffn(self) -> None:
        """Initialise each layer's query FFN from its text FFN (no-op without text FFNs)."""
        if not self.with_text:
            return
        for layer in self.encoder.layer:
            layer.intermediate_query.load_state_dict(layer.intermediate.state_dict())
            layer.output_query.load_state_dict(layer.output.state_dict())

    # ------------------------------------------------------------------ helpers
    def _require_text(self, mode: str) -> None:
        if not self.with_text:
            raise RuntimeError(
                f"{mode} needs the Q-Former's text parts, but it was built with with_text=False (stage-2 layout)"
            )

    def embed(
        self, query_embeds: torch.Tensor | None = None, input_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``LayerNorm(cat(queries, word + position embeddings))`` with dropout (BERT embeddings)."""
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds.to(self.layernorm.weight.dtype))
        if input_ids is not None:
            self._require_text("embedding text")
            parts.append(self.embeddings(input_ids).to(self.layernorm.weight.dtype))
        if not parts:
            raise ValueError("embed() needs query_embeds, input_ids or both")
        return self.dropout(self.layernorm(torch.cat(parts, dim=1)))

    @staticmethod
    def _encoder_mask(encoder_attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        # All image tokens are valid in BLIP-2; a mask is only built when some are not.
        if encoder_attention_mask is None or bool(encoder_attention_mask.all()):
            return None
        return padding_mask(encoder_attention_mask)

    # -------------------------------------------------------------------- modes
    def forward(
        self,
        query_embeds: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_key_values: bool = False,
    ) -> QFormerOutput:
        """Mode (a): queries ``[B, Q, H]`` self-attend and cross-attend to image features ``[B, N, Dv]``.

        With ``return_key_values`` the output carries each layer's self-attention keys and
        values of the queries, for :meth:`decode_text`.
        """
        hidden = self.embed(query_embeds=query_embeds)
        return self.encoder(
            hidden,
            None,
            query_embeds.shape[1],
            encoder_hidden_states,
            self._encoder_mask(encoder_attention_mask),
            return_key_values=return_key_values,
        )

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> QFormerOutput:
        """Mode (b): text alone ``[B, T]``, bidirectional with padding masked, text FFN only."""
        self._require_text("encode_text")
        hidden = self.embed(input_ids=input_ids)
        return self.encoder(hidden, padding_mask(attention_mask), 0)

    def encode_query_text(
        self,
        query_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> QFormerOutput:
        """Mode (c): ``[queries, text]`` attend to each other fully (text padding masked).

        Only the query positions cross-attend; the output covers all ``Q + T`` positions.
        """
        self._require_text("encode_query_text")
        num_queries = query_embeds.shape[1]
        hidden = self.embed(query_embeds=query_embeds, input_ids=input_ids)
        query_keys = torch.ones(
            attention_mask.shape[0], num_queries, dtype=attention_mask.dtype, device=attention_mask.device
        )
        mask = padding_mask(torch.cat([query_keys, attention_mask], dim=1))
        return self.encoder(
            hidden, mask, num_queries, encoder_hidden_states, self._encoder_mask(encoder_attention_mask)
        )

    def decode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_key_values: list[KeyValue]
    ) -> QFormerOutput:
        """Mode (d): causal text conditioned on the queries through their cached keys/values.

        ``query_key_values`` come from :meth:`forward` with ``return_key_values=True``.
        Text positions start at 0 (the queries have no positions), as in LAVIS.
        """
        self._require_text("decode_text")
        if len(query_key_values) != len(self.encoder.layer):
            raise ValueError(
                f"need keys/values for {len(self.encoder.layer)} layers, got {len(query_key_values)}"
            )
        num_queries = query_key_values[0][0].shape[2]
        hidden = self.embed(input_ids=input_ids)
        mask = causal_text_mask(attention_mask, num_queries)
        return self.encoder(hidden, mask, 0, past_key_values=query_key_values)
