"""Training FLOPs of each model part, from the config and the real token counts.

FLOPs count matmuls only (2 per multiply-add), as Megatron and nanoGPT's MFU do. Per
training step each part costs: trained = 3x forward (forward, input grads, weight grads),
frozen with gradients flowing through it to something trainable = 2x forward (forward and
input grads), frozen with nothing trainable upstream = 1x forward.

The throughput meter (``training/throughput.py``) counts every batch with it, and the
pipeline split (:func:`pipeline_layer_ranges`) balances the stages with it.
"""

from __future__ import annotations

from blip2_megatron.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2_megatron.parallel.pipeline import balanced_layer_ranges


def vision_forward_flops(cfg: VisionConfig) -> float:
    n, d, i = cfg.num_positions, cfg.hidden_size, cfg.intermediate_size
    patch = 2.0 * cfg.num_patches * 3 * cfg.patch_size**2 * d
    per_layer = 2.0 * n * (4 * d * d + 2 * d * i) + 4.0 * n * n * d
    return patch + cfg.num_layers * per_layer


def qformer_forward_flops(cfg: QFormerConfig, num_query: int, num_text: int, image_tokens: int) -> float:
    """One Q-Former pass over ``num_query`` query and ``num_text`` text tokens."""
    h, i, dv = cfg.hidden_size, cfg.intermediate_size, cfg.encoder_hidden_size
    s = num_query + num_text
    total = 0.0
    for layer in range(cfg.num_layers):
        total += 2.0 * s * 4 * h * h + 4.0 * s * s * h + 2.0 * s * 2 * h * i
        if cfg.has_cross_attention(layer) and num_query:
            total += 2.0 * num_query * 2 * h * h  # query and output projections
            total += 2.0 * image_tokens * 2 * dv * h  # image keys and values
            total += 4.0 * num_query * image_tokens * h
    return total


def llm_layer_forward_flops(cfg: LLMConfig, seq_len: int) -> float:
    """One decoder layer's forward over ``seq_len`` tokens."""
    d, kv = cfg.hidden_size, cfg.kv_heads * cfg.head_dim
    attn_proj = 2 * d * d + 2 * d * kv
    ffn = (3 if cfg.arch == "llama" else 2) * d * cfg.intermediate_size
    return 2.0 * seq_len * (attn_proj + ffn) + 4.0 * seq_len * seq_len * d


def llm_head_forward_flops(cfg: LLMConfig, seq_len: int) -> float:
    return 2.0 * seq_len * cfg.hidden_size * cfg.vocab_size


def train_flops_by_part(cfg: Blip2Config, lengths: list[int], first_label: int = 0) -> dict[str, float]:
    """Training FLOPs of one batch by part (``vision``, ``qformer``, ``llm``), from its real lengths.

    ``lengths``: per sample, the tokens the model reads without padding: the LLM input
    (image slots, prompt and caption) for LLM jobs; the caption for stage 1. Padding is
    computed but is not useful work, so it does not count (as MFU is usually defined).
    ``first_label``: the batch's first labelled position (``data.batch``): the head's
    logits before the position ahead of it predict nothing, so they do not count either.
    """
    q = cfg.qformer.num_query_tokens
    image_tokens = cfg.vision.num_positions
    images = len(lengths)
    parts = {"vision": images * vision_forward_flops(cfg.vision) * (1 if cfg.vision.freeze else 3)}
    if cfg.kind == "stage1":
        per_caption = [
            qformer_forward_flops(cfg.qformer, q, 0, image_tokens)  # ITC image side
            + qformer_forward_flops(cfg.qformer, 0, t, 0)  # ITC text side
            + 3 * qformer_forward_flops(cfg.qformer, q, t, image_tokens)  # ITM on 3B pairs
            + qformer_forward_flops(cfg.qformer, q, t, 0)  # ITG (query K/V reused)
            for t in lengths
        ]
        parts["qformer"] = 3 * sum(per_caption)
        return parts
    if cfg.image_encoder == "patches":
        parts["qformer"] = 0.0
    else:
        parts["qformer"] = images * qformer_forward_flops(cfg.qformer, q, 0, image_tokens)
        parts["qformer"] *= 1 if cfg.freeze_qformer else 3
    parts["qformer"] += images * 2.0 * cfg.num_image_slots * cfg.image_feature_size * cfg.llm.hidden_size * 3
    skipped = max(first_label - 1, 0)
    llm = cfg.llm
    forward = sum(
        llm.num_layers * llm_layer_forward_flops(llm, n) + llm_head_forward_flops(llm, max(n - skipped, 0))
        for n in lengths
    )
    parts["llm"] = forward * (2 if llm.freeze else 3)
    return parts


def train_flops_per_image(cfg: Blip2Config, text_len: int | None = None) -> float:
    """Training FLOPs of one image-text sample whose caption has ``text_len`` tokens (``max_txt_len``)."""
    text_len = text_len or cfg.max_txt_len
    length = text_len if cfg.kind == "stage1" else cfg.num_image_slots + text_len
    return sum(train_flops_by_part(cfg, [length]).values())


def pipeline_costs(cfg: Blip2Config, seq_len: int | None = None) -> tuple[float, float, float]:
    """Training FLOPs per sample of (the image path, one decoder layer, the head).

    The image path (ViT, Q-Former, projection) runs on pipeline stage 0 and the head on the
    last one. ``seq_len`` defaults to the image slots plus ``max_txt_len`` text tokens.
    """
    llm = cfg.llm
    seq_len = seq_len or cfg.num_image_slots + cfg.max_txt_len
    image_path = sum(v for k, v in train_flops_by_part(cfg, [seq_len]).items() if k != "llm")
    passes = 2 if llm.freeze else 3
    layer = llm_layer_forward_flops(llm, seq_len) * passes
    # The pipeline's last stage computes every position's logits (first_label is not sent along).
    return image_path, layer, llm_head_forward_flops(llm, seq_len) * passes


def stage_train_flops(cfg: Blip2Config, ranges: list[tuple[int, int]]) -> list[float]:
    """Training FLOPs per sample of each pipeline stage holding the decoder layer ``ranges``."""
    image_path, layer, head = pipeline_costs(cfg)
    flops = [(end - start) * layer for start, end in ranges]
    flops[0] += image_path
    flops[-1] += head
    return flops


def pipeline_layer_ranges(cfg: Blip2Config, num_stages: int) -> list[tuple[int, int]]:
    """Decoder layers per pipeline stage, balanced by training FLOPs (stage 0 carries the image path)."""
    image_path, layer, head = pipeline_costs(cfg)
    return balanced_layer_ranges(
        cfg.llm.num_layers, num_stages, layer, first_extra=image_path, last_extra=head
    )
