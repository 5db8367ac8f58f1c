"""Training FLOPs of each model part, from the config and the real token counts.

FLOPs count matmuls only (2 per multiply-add), as Megatron and nanoGPT's MFU do. Per
training step each part costs: trained = 3x forward (forward, input grads, weight grads),
frozen with gradients flowing through it to something trainable = 2x forward (forward and
input grads), frozen with nothing trainable upstream = 1x forward.

The throughput meter (``training/throughput.py``) counts every batch with it, and the
pipeline split (:func:`pipeline_partition`) balances the stages with it.
"""

from __future__ import annotations

from blip2_megatron.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2_megatron.parallel.pipeline import PipelineStage, balanced_partition, stages_from_cuts


def vision_patch_flops(cfg: VisionConfig) -> float:
    """The patch embedding's forward (one image)."""
    return 2.0 * cfg.num_patches * 3 * cfg.patch_size**2 * cfg.hidden_size


def vision_block_flops(cfg: VisionConfig) -> float:
    """One ViT block's forward (one image)."""
    n, d, i = cfg.num_positions, cfg.hidden_size, cfg.intermediate_size
    return 2.0 * n * (4 * d * d + 2 * d * i) + 4.0 * n * n * d


def vision_forward_flops(cfg: VisionConfig) -> float:
    return vision_patch_flops(cfg) + cfg.num_layers * vision_block_flops(cfg)


def qformer_passes(cfg: Blip2Config) -> int:
    """Forward passes one training step costs the Q-Former: trained 3, frozen under a trained ViT 2
    (input gradients only), frozen with nothing trainable before it 1."""
    if not cfg.freeze_qformer:
        return 3
    return 1 if cfg.vision.freeze else 2


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
    """One decoder layer's (or T5 encoder layer's) forward over ``seq_len`` tokens."""
    d, width, kv = cfg.hidden_size, cfg.attention_width, cfg.kv_heads * cfg.head_dim
    attn_proj = 2 * d * width + 2 * d * kv
    ffn = (2 if cfg.activation == "relu" else 3) * d * cfg.intermediate_size
    return 2.0 * seq_len * (attn_proj + ffn) + 4.0 * seq_len * seq_len * width


def cross_attention_forward_flops(cfg: LLMConfig, target_len: int, source_len: int) -> float:
    """One T5 decoder layer's cross-attention: q / o over the targets, k / v over the encoder's output."""
    d, width = cfg.hidden_size, cfg.attention_width
    return 2.0 * (2 * target_len + 2 * source_len) * d * width + 4.0 * target_len * source_len * width


def llm_forward_flops(cfg: LLMConfig, length: int, target_len: int = 0, skipped: int = 0) -> float:
    """The LLM's forward over one sequence: decoder-only over ``length`` tokens (the head
    from ``skipped`` on), or T5's encoder over ``length`` and decoder over ``target_len``."""
    if not cfg.is_encoder_decoder:
        return cfg.num_layers * llm_layer_forward_flops(cfg, length) + llm_head_forward_flops(
            cfg, max(length - skipped, 0)
        )
    decoder_layer = llm_layer_forward_flops(cfg, target_len) + cross_attention_forward_flops(
        cfg, target_len, length
    )
    return (
        cfg.num_layers * llm_layer_forward_flops(cfg, length)
        + cfg.decoder_layers * decoder_layer
        + llm_head_forward_flops(cfg, target_len)
    )


def llm_head_forward_flops(cfg: LLMConfig, seq_len: int) -> float:
    return 2.0 * seq_len * cfg.hidden_size * cfg.vocab_size


def train_flops_by_part(
    cfg: Blip2Config,
    lengths: list[int],
    first_label: int = 0,
    target_lengths: list[int] | None = None,
    instruction_lengths: list[int] | None = None,
) -> dict[str, float]:
    """Training FLOPs of one batch by part (``vision``, ``qformer``, ``llm``), from its real lengths.

    ``lengths``: per sample, the tokens the model reads without padding: the LLM input
    (image slots, prompt and caption) for LLM jobs; the caption for stage 1. Padding is
    computed but is not useful work, so it does not count (as MFU is usually defined).
    ``first_label``: the batch's first labelled position (``data.batch``): the head's
    logits before the position ahead of it predict nothing, so they do not count either.
    ``target_lengths``: an encoder-decoder LLM's decoder tokens per sample (``lengths`` are
    then its encoder's; default ``max_txt_len``). ``instruction_lengths``: an
    instruction-aware Q-Former's instruction tokens per sample (InstructBLIP; they run
    through its self-attention and text FFN beside the queries).
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
        texts = instruction_lengths or [0] * images
        parts["qformer"] = sum(qformer_forward_flops(cfg.qformer, q, t, image_tokens) for t in texts)
        parts["qformer"] *= qformer_passes(cfg)
    parts["qformer"] += images * 2.0 * cfg.num_image_slots * cfg.image_feature_size * cfg.llm.hidden_size * 3
    skipped = max(first_label - 1, 0)
    llm = cfg.llm
    targets = target_lengths or [cfg.max_txt_len if llm.is_encoder_decoder else 0] * len(lengths)
    forward = sum(llm_forward_flops(llm, n, t, skipped) for n, t in zip(lengths, targets, strict=True))
    parts["llm"] = forward * (2 if llm.freeze else 3)
    return parts


def train_flops_per_image(cfg: Blip2Config, text_len: int | None = None) -> float:
    """Training FLOPs of one image-text sample whose caption has ``text_len`` tokens (``max_txt_len``)."""
    text_len = text_len or cfg.max_txt_len
    length = text_len if cfg.kind == "stage1" else cfg.num_image_slots + text_len
    return sum(train_flops_by_part(cfg, [length]).values())


def pipeline_unit_costs(cfg: Blip2Config, seq_len: int | None = None) -> list[float]:
    """Training FLOPs per sample of each pipeline unit, in forward order.

    The units (``parallel/pipeline.py``): the ViT blocks (block 0 with the patch embedding),
    the bridge (Q-Former or patch grouping, projection), each decoder layer, the head. A
    trained ViT's blocks cost 3 forwards, a frozen one's 1 (nothing trainable before them);
    the LLM's parts cost 2 frozen (gradients flow back to the projection) and 3 trained.
    ``seq_len`` defaults to the image slots plus ``max_txt_len`` text tokens; the pipeline's
    last stage computes every position's logits (first_label is not sent along).
    """
    llm = cfg.llm
    seq_len = seq_len or cfg.num_image_slots + cfg.max_txt_len
    vision_passes = 1 if cfg.vision.freeze else 3
    blocks = [vision_block_flops(cfg.vision) * vision_passes for _ in range(cfg.vision.num_layers)]
    blocks[0] += vision_patch_flops(cfg.vision) * vision_passes
    image_path = sum(v for k, v in train_flops_by_part(cfg, [seq_len]).items() if k != "llm")
    bridge = image_path - sum(blocks)
    llm_passes = 2 if llm.freeze else 3
    layers = [llm_layer_forward_flops(llm, seq_len) * llm_passes for _ in range(llm.num_layers)]
    return [*blocks, bridge, *layers, llm_head_forward_flops(llm, seq_len) * llm_passes]


def embedding_stays_on_first_stage(cfg: Blip2Config) -> bool:
    """A trained LLM with tied embeddings (OPT) keeps its token embedding, so the bridge, on stage 0.

    Its head copy on the last stage is the same weight: their gradients are summed over
    megatron-core's embedding group, which holds the first and last stages only, and the
    engine starts both equal from stage 0 (``training/engine.py``). A frozen tied LLM only
    needs them equal at the start, which the engine arranges from any stage.
    """
    return cfg.llm.tie_word_embeddings and not cfg.llm.freeze


def pipeline_partition(cfg: Blip2Config, num_stages: int) -> list[PipelineStage]:
    """What each of ``num_stages`` pipeline stages holds, balanced by training FLOPs over the whole model.

    The cut minimises the costliest stage over the units of :func:`pipeline_unit_costs`
    (ViT blocks, bridge, decoder layers, head), so a trained ViT-g at 364 px spreads over
    stages instead of loading stage 0 alone; under :func:`embedding_stays_on_first_stage`
    the whole image path stays on stage 0 and the rest is balanced after it.
    """
    vision_blocks, layers = cfg.vision.num_layers, cfg.llm.num_layers
    if num_stages == 1:
        return [PipelineStage.whole(vision_blocks, layers)]
    first_stage_min_units = vision_blocks + 1 if embedding_stays_on_first_stage(cfg) else 1
    ends = balanced_partition(pipeline_unit_costs(cfg), num_stages, first_stage_min_units)
    return stages_from_cuts(vision_blocks, layers, ends)


def stage_train_flops(cfg: Blip2Config, stages: list[PipelineStage]) -> list[float]:
    """Training FLOPs per sample of each pipeline stage of ``stages``."""
    costs = pipeline_unit_costs(cfg)
    vision_blocks = cfg.vision.num_layers
    bridge = costs[vision_blocks]
    layer_costs, head = costs[vision_blocks + 1 : -1], costs[-1]
    flops = []
    for stage in stages:
        start, end = stage.vision_blocks or (0, 0)
        total = sum(costs[start:end])
        total += bridge if stage.has_bridge else 0.0
        total += sum(layer_costs[stage.llm_layers[0] : stage.llm_layers[1]])
        total += head if stage.has_head else 0.0
        flops.append(total)
    return flops
