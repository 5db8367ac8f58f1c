"""BLIP-2 stage 1: Q-Former pretraining with ITC, ITM and ITG (LAVIS ``Blip2Qformer``).

The three losses are summed without weights:

* ITC - image-text contrastive. Image side: the normalised projections of all query
  outputs; text side: the normalised projection of the [CLS] output. Similarity = max
  over queries / learnable temperature. Negatives come from the whole data-parallel
  batch (gathered copies carry no gradient; the local copy does). Pairs with the same
  ``image_id`` count as positives (soft targets). CE with label smoothing 0.1, averaged
  over both directions.
* ITM - image-text matching on ``[queries, text]`` with full mutual attention: every
  image with its text (label 1), with a hard negative text, and every text with a hard
  negative image (label 0), negatives drawn from the softmax over ITC similarities with
  positives excluded. Logits = mean over query outputs of ``itm_head``.
* ITG - image-grounded text generation: [DEC] replaces [CLS]; text attends to all
  queries (their cached keys/values from the ITC pass) and causally to earlier text.
  CE with label smoothing 0.1 on the next token, padding ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from blip2_megatron.config import Blip2Config, QFormerConfig
from blip2_megatron.data.batch import IGNORE_INDEX
from blip2_megatron.models.qformer import KeyValue, QFormer
from blip2_megatron.models.query_encoder import QueryEncoder
from blip2_megatron.models.vision import VisionEncoder, freeze_vision, frozen_vision_dtype

logger = logging.getLogger(__name__)

LABEL_SMOOTHING = 0.1  # ITC and ITG (LAVIS); ITM uses plain CE
TEMP_INIT = 0.07
TEMP_RANGE = (0.001, 0.5)


# ----------------------------------------------------------------------------- helpers


@dataclass
class TextTokens:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token


class BatchGatherer:
    """All-gathers per-sample tensors over a data-parallel group along dim 0.

    Gathered copies from other ranks carry no gradient; this rank's slice is the local
    tensor itself, so its gradient flows. Ranks may hold different batch sizes (the sizes
    are exchanged once, tensors padded for the collective). ``group=None`` or a group of
    one process: no communication, the local tensor is returned.
    """

    def __init__(self, group: dist.ProcessGroup | None, local_size: int, device: torch.device):
        self.group = group
        self.local_size = local_size
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            self.rank, self.sizes = 0, [local_size]
            return
        self.rank = dist.get_rank(group)
        size = torch.tensor([local_size], dtype=torch.long, device=device)
        sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
        dist.all_gather(sizes, size, group=group)
        self.sizes = [int(s.item()) for s in sizes]

    @property
    def offset(self) -> int:
        """Index of this rank's first sample in the gathered batch."""
        return sum(self.sizes[: self.rank])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if len(self.sizes) == 1:
            return tensor
        longest = max(self.sizes)
        padded = tensor.detach()
        if tensor.shape[0] < longest:
            pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
            padded = torch.cat([padded, pad])
        buffers = [torch.empty_like(padded) for _ in self.sizes]
        dist.all_gather(buffers, padded.contiguous(), group=self.group)
        parts = [buf[:n] for buf, n in zip(buffers, self.sizes)]
        parts[self.rank] = tensor
        return torch.cat(parts)


def positive_pairs(
    local_codes: torch.Tensor | None, all_codes: torch.Tensor | None, offset: int, local_size: int, total: int
) -> torch.Tensor:
    """``[B, B_all]`` booleans: which gathered pairs are positives for each local sample.

    With image ids, every pair whose image id matches; without, only the sample itself
    (column ``offset + row``).
    """
    if local_codes is not None and all_codes is not None:
        return local_codes[:, None] == all_codes[None, :]
    positives = torch.zeros(local_size, total, dtype=torch.bool)
    positives[:, offset : offset + local_size] = torch.eye(local_size, dtype=torch.bool)
    return positives


def sample_hard_negatives(similarity: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """One index per row drawn from ``softmax(similarity)`` with positives excluded.

    A row whose every candidate is a positive (all images in the gathered batch share one
    id) draws uniformly; LAVIS's -10000 fill does the same.
    """
    weights = torch.softmax(similarity.float().masked_fill(positives, float("-inf")), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)
    no_negative = weights.sum(dim=1, keepdim=True) == 0
    weights = torch.where(no_negative, torch.ones_like(weights), weights)
    return torch.multinomial(weights, 1).squeeze(1)


@dataclass
class ContrastiveOutput:
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # [B, B_all] local images vs gathered texts, divided by temp
    sim_t2i: torch.Tensor  # [B, B_all] local texts vs gathered images, divided by temp
    positives: torch.Tensor  # [B, B_all] bool
    targets: torch.Tensor  # [B, B_all] soft targets before label smoothing (rows sum to 1)


class QFormerPredictionTransform(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class QFormerLMHead(nn.Module):
    """BERT's LM head (LAVIS ``Qformer.cls.predictions``): dense + GELU + LayerNorm, then vocabulary.

    The vocabulary projection shares its weight with the word embeddings (BERT ties them
    and LAVIS keeps the tie); its bias is its own.
    """

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.transform = QFormerPredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        with torch.no_grad():
            nn.init.normal_(self.transform.dense.weight, std=cfg.initializer_range)
            nn.init.zeros_(self.transform.dense.bias)
            nn.init.normal_(self.decoder.weight, std=cfg.initializer_range)
            nn.init.zeros_(self.decoder.bias)
        if word_embeddings is not None:
            self.decoder.weight = word_embeddings.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


# ------------------------------------------------------------------------------- model


class Blip2Stage1(nn.Module):
    """ViT + Q-Former with ITC / ITM / ITG heads.

    ``forward(batch)`` takes the stage-1 batch builder's tensors (``image``, ``input_ids``
    and ``attention_mask`` of the captions padded to ``qformer.max_txt_len``, optional
    ``image_codes``) and returns ``{"loss", "loss_itc", "loss_itm", "loss_lm"}``.
    ``dp_group`` (constructor argument or attribute) is the data-parallel group ITC
    negatives and ITM hard negatives are gathered over; ``None`` uses the local batch only.
    """

    def __init__(self, cfg: Blip2Config, dp_group: dist.ProcessGroup | None = None):
        super().__init__()
        q = cfg.qformer
        self.cfg = cfg
        self.dp_group = dp_group
        self.query_encoder = QueryEncoder(cfg, with_text=True)
        self.vision_proj = nn.Linear(q.hidden_size, q.embed_dim)
        self.text_proj = nn.Linear(q.hidden_size, q.embed_dim)
        self.itm_head = nn.Linear(q.hidden_size, 2)
        # One element, not a 0-dim tensor: DeepSpeed broadcasts parameters as byte views,
        # which a 0-dim tensor cannot give (LAVIS stores a 0-dim "temp"; convert/ reshapes).
        self.temp = nn.Parameter(torch.full((1,), TEMP_INIT))
        self.lm_head = QFormerLMHead(q, self.qformer.embeddings.word_embeddings)
        if cfg.vision.freeze:
            freeze_vision(self.query_encoder.visual_encoder, frozen_vision_dtype(cfg.vision))

    @property
    def qformer(self) -> QFormer:
        return self.query_encoder.qformer

    @property
    def visual_encoder(self) -> VisionEncoder:
        return self.query_encoder.visual_encoder

    # ----------------------------------------------------------------- losses
    def compute_itc(
        self,
        image_feats: torch.Tensor,
        text_feat: torch.Tensor,
        image_codes: torch.Tensor | None = None,
        gatherer: BatchGatherer | None = None,
    ) -> ContrastiveOutput:
        """ITC loss from normalised ``image_feats [B, Q, E]`` and ``text_feat [B, E]``."""
        batch = image_feats.shape[0]
        if gatherer is None:
            gatherer = BatchGatherer(self.dp_group, batch, image_feats.device)
        # Similarities in fp32: with temp down to 0.001 they reach 1000, too large for fp16.
        image_feats, text_feat = image_feats.float(), text_feat.float()
        image_feats_all, text_feat_all = gatherer(image_feats), gatherer(text_feat)
        temp = self.temp.float()
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat_all).amax(dim=-1) / temp
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).amax(dim=-1) / temp
        all_codes = gatherer(image_codes) if image_codes is not None else None
        positives = positive_pairs(image_codes, all_codes, gatherer.offset, batch, gatherer.total)
        positives = positives.to(sim_i2t.device)
        targets = positives.float() / positives.sum(dim=1, keepdim=True)
        loss = (
            F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
        ) / 2
        return ContrastiveOutput(loss, sim_i2t, sim_t2i, positives, targets)

    def compute_itm(
        self,
        image_embeds: torch.Tensor,
        tokens: TextTokens,
        itc: ContrastiveOutput,
        gatherer: BatchGatherer,
    ) -> torch.Tensor:
        """ITM loss on B positive pairs, B hard-negative texts and B hard-negative images."""
        batch = image_embeds.shape[0]
        with torch.no_grad():
            negative_image = sample_hard_negatives(itc.sim_t2i, itc.positives)  # one image per text
            negative_text = sample_hard_negatives(itc.sim_i2t, itc.positives)  # one text per image
        image_embeds_all = gatherer(image_embeds)
        ids_all, mask_all = gatherer(tokens.input_ids), gatherer(tokens.attention_mask)
        # Rows: (image, its text) -> 1, (image, negative text) -> 0, (negative image, text) -> 0.
        text_ids = torch.cat([tokens.input_ids, ids_all[negative_text], tokens.input_ids])
        text_mask = torch.cat([tokens.attention_mask, mask_all[negative_text], tokens.attention_mask])
        images = torch.cat([image_embeds, image_embeds, image_embeds_all[negative_image]])
        logits = self._itm_logits(images, text_ids, text_mask)
        labels = torch.zeros(3 * batch, dtype=torch.long, device=logits.device)
        labels[:batch] = 1
        return F.cross_entropy(logits.float(), labels)

    def compute_itg(self, tokens: TextTokens, query_key_values: list[KeyValue]) -> torch.Tensor:
        """Next-token CE of the caption with [DEC] as first token, conditioned on the queries."""
        q = self.cfg.qformer
        input_ids = tokens.input_ids.clone()
        input_ids[:, 0] = q.bos_token_id
        labels = input_ids.masked_fill(input_ids == q.pad_token_id, IGNORE_INDEX)
        hidden = self.qformer.decode_text(
            input_ids, tokens.attention_mask, query_key_values
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        # Only positions with a target go through the vocabulary projection (saves the
        # [B, T, vocab] logits of the padding).
        logits = self.lm_head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], label_smoothing=LABEL_SMOOTHING)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = batch["image"]
        tokens = TextTokens(batch["input_ids"], batch["attention_mask"])
        if tokens.input_ids.shape[0] != image.shape[0]:
            raise ValueError(f"batch has {image.shape[0]} images but {tokens.input_ids.shape[0]} texts")
        with torch.no_grad():
            self.temp.clamp_(*TEMP_RANGE)

        image_embeds = self.query_encoder.encode_image(image)
        query_out = self.query_encoder.query_output(image_embeds, return_key_values=True)
        image_feats = F.normalize(self.vision_proj(query_out.last_hidden_state), dim=-1)
        text_out = self.qformer.encode_text(tokens.input_ids, tokens.attention_mask)
        text_feat = F.normalize(self.text_proj(text_out.last_hidden_state[:, 0]), dim=-1)

        gatherer = BatchGatherer(self.dp_group, image.shape[0], image.device)
        itc = self.compute_itc(image_feats, text_feat, batch.get("image_codes"), gatherer)
        loss_itm = self.compute_itm(image_embeds, tokens, itc, gatherer)
        loss_lm = self.compute_itg(tokens, query_out.key_values)
        return {
            "loss": itc.loss + loss_itm + loss_lm,
            "loss_itc": itc.loss,
            "loss_itm": loss_itm,
            "loss_lm": loss_lm,
        }

    # ------------------------------------------------------- features / retrieval
    def _itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        queries = self.query_encoder.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer.encode_query_text(queries, input_ids, attention_mask, image_embeds)
        return self.itm_head(out.last_hidden_state[:, : queries.shape[1]]).mean(dim=1)

    def forward_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(query outputs ``[B, Q, H]``, image features after ln_vision ``[B, N, Dv]``), as LAVIS."""
        image_embeds = self.query_encoder.encode_image(image)
        return self.query_encoder.query_output(image_embeds).last_hidden_state, image_embeds

    def image_embeds_itc(
        self, image: torch.Tensor | None = None, *, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised ITC image features ``[B, Q, embed_dim]`` from images or cached ViT features."""
        if image_embeds is None:
            image_embeds = self.query_encoder.encode_image(image)
        queries = self.query_encoder.query_output(image_embeds).last_hidden_state
        return F.normalize(self.vision_proj(queries), dim=-1)

    def text_embeds_itc(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised ITC text features ``[B, embed_dim]`` of Q-Former tokens."""
        out = self.qformer.encode_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0]), dim=-1)

    def itm_scores(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        as_probability: bool = False,
    ) -> torch.Tensor:
        """ITM score ``[B]`` of pairs (image i, text i): the positive-class logit, or its softmax probability.

        ``image_embeds`` are ViT features (:meth:`encode_image`), so retrieval re-ranking
        encodes each image once.
        """
        logits = self._itm_logits(image_embeds, input_ids, attention_mask)
        return logits.float().softmax(dim=-1)[:, 1] if as_probability else logits[:, 1]

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """ViT features after ln_vision ``[B, N, Dv]``."""
        return self.query_encoder.encode_image(image)
