"""Image -> query outputs: the part every BLIP-2 model shares (ViT + ln_vision -> Q-Former).

:class:`QueryEncoder` holds ``visual_encoder``, ``qformer`` and ``query_tokens`` so that
Hugging Face ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` weights
map by prefix renames (``vision_model.`` -> ``visual_encoder.``, ``qformer.`` and
``query_tokens`` unchanged; see ``blip2_megatron.convert.vision_qformer``). The stage-1
model and the LLM models both compose it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from blip2_megatron.config import Blip2Config
from blip2_megatron.models.qformer import QFormer, QFormerOutput
from blip2_megatron.models.vision import VisionEncoder

logger = logging.getLogger(__name__)


class QueryEncoder(nn.Module):
    """Vision encoder + Q-Former + learned query tokens.

    ``with_text`` keeps the Q-Former's text embeddings and text FFNs; by default the stage-1
    model and an instruction-aware one (InstructBLIP, ``model.instruction_aware``) have them
    (BLIP-2's stage 2 drops them, as LAVIS and Hugging Face do).
    """

    def __init__(self, cfg: Blip2Config, with_text: bool | None = None):
        super().__init__()
        self.cfg = cfg
        if with_text is None:
            with_text = cfg.kind == "stage1" or cfg.instruction_aware
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.qformer = QFormer(cfg.qformer, with_text=with_text)
        q = cfg.qformer
        self.query_tokens = nn.Parameter(
            torch.empty(1, q.num_query_tokens, q.hidden_size).normal_(std=q.initializer_range)
        )

    @property
    def num_query_tokens(self) -> int:
        return self.query_tokens.shape[1]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """ViT + ln_vision: ``[B, 3, S, S] -> [B, N, vision hidden]`` (fp32)."""
        return self.visual_encoder(image)

    def query_output(self, image_embeds: torch.Tensor, return_key_values: bool = False) -> QFormerOutput:
        """Q-Former query-only pass over image features (mode (a))."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return self.qformer(queries, image_embeds, return_key_values=return_key_values)

    def instructed_query_output(
        self,
        image_embeds: torch.Tensor,
        qformer_input_ids: torch.Tensor,
        qformer_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """InstructBLIP: the query outputs ``[B, Q, H]`` of queries and instruction read together (mode (c)).

        The instruction's tokens ``[B, T]`` (padding masked) attend with the queries in the
        Q-Former's self-attention; only the queries cross-attend to the image, and only
        their outputs are kept.
        """
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer.encode_query_text(queries, qformer_input_ids, qformer_attention_mask, image_embeds)
        return out.last_hidden_state[:, : self.num_query_tokens]

    def forward(
        self,
        image: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Query outputs ``[B, Q, qformer hidden]`` for a batch of images (and their instructions).

        With ``qformer_input_ids`` (InstructBLIP) the queries read the instruction too; the
        mask defaults to all ones.
        """
        image_embeds = self.encode_image(image)
        if qformer_input_ids is None:
            return self.query_output(image_embeds).last_hidden_state
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        return self.instructed_query_output(image_embeds, qformer_input_ids, qformer_attention_mask)
