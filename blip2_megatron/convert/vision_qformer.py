"""Vision encoder / Q-Former / stage-1 head weights: LAVIS and Hugging Face <-> ours.

Our names (see ``models/stage1.py`` and ``models/query_encoder.py``)::

    query_encoder.visual_encoder.*    Hugging Face Blip2VisionModel names (+ post_layernorm = ln_vision)
    query_encoder.qformer.*           Hugging Face Blip2QFormerModel names (+ embeddings.*)
    query_encoder.query_tokens
    vision_proj.*, text_proj.*, itm_head.*, temp, lm_head.*      (stage 1 only)
    patch_encoder.visual_encoder.*    the same ViT names in a model without a Q-Former
                                      (``image_encoder="patches"``): pass ``prefix=PATCH_ENCODER_PREFIX``

Conversions are explicit key-template maps: ``"{}"`` stands for a layer index. Each
converter returns ``(converted, unconsumed_keys)`` so the caller sees exactly what was
left over (an OPT projection, the 40th EVA block, ...). :func:`load_into` then loads a
converted dict into a module, reports missing / unexpected keys by name, resizes ViT
position embeddings of another resolution and refuses shape mismatches naming the
tensor.

Sources:

* LAVIS ``blip2_pretrained.pth`` (and stage-2 checkpoints): ``visual_encoder.*`` (EVA
  ViT-g or CLIP ViT-L names), ``ln_vision.*``, ``Qformer.bert.*``, ``Qformer.cls.*``,
  ``query_tokens``, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``.
* LAVIS ``eva_vit_g.pth`` / ``clip_vit_L.pth``: the same vision names without the
  ``visual_encoder.`` prefix (and one block more than BLIP-2 uses).
* Hugging Face ``Blip2ForConditionalGeneration`` / ``Blip2ForImageTextRetrieval`` /
  ``Blip2Model`` and ``InstructBlipForConditionalGeneration``: prefix renames only.
* LAVIS InstructBLIP (``blip2_vicuna_instruct`` / ``blip2_t5_instruct``): the BLIP-2 names,
  with the Q-Former's text embeddings and text FFN kept (``Qformer.bert.embeddings.*``).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from blip2_megatron.models.vision import interpolate_position_embedding

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]

QUERY_ENCODER_PREFIX = "query_encoder."
PATCH_ENCODER_PREFIX = "patch_encoder."  # the ViT of a model without a Q-Former (MiniGPT-4 LLaMA-2)

# ----------------------------------------------------------------------------- maps
# LAVIS EVA ViT-g (eva_vit.py) -> ours (VisionEncoder-relative). q_bias / v_bias are
# merged into qkv.bias separately (EVA_QKV_BIAS).
EVA_VIT_KEYS: dict[str, str] = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "blocks.{}.norm1.weight": "encoder.layers.{}.layer_norm1.weight",
    "blocks.{}.norm1.bias": "encoder.layers.{}.layer_norm1.bias",
    "blocks.{}.attn.qkv.weight": "encoder.layers.{}.self_attn.qkv.weight",
    "blocks.{}.attn.proj.weight": "encoder.layers.{}.self_attn.projection.weight",
    "blocks.{}.attn.proj.bias": "encoder.layers.{}.self_attn.projection.bias",
    "blocks.{}.norm2.weight": "encoder.layers.{}.layer_norm2.weight",
    "blocks.{}.norm2.bias": "encoder.layers.{}.layer_norm2.bias",
    "blocks.{}.mlp.fc1.weight": "encoder.layers.{}.mlp.fc1.weight",
    "blocks.{}.mlp.fc1.bias": "encoder.layers.{}.mlp.fc1.bias",
    "blocks.{}.mlp.fc2.weight": "encoder.layers.{}.mlp.fc2.weight",
    "blocks.{}.mlp.fc2.bias": "encoder.layers.{}.mlp.fc2.bias",
}
EVA_Q_BIAS = "blocks.{}.attn.q_bias"
EVA_V_BIAS = "blocks.{}.attn.v_bias"
QKV_BIAS = "encoder.layers.{}.self_attn.qkv.bias"

# LAVIS CLIP ViT-L (clip_vit.py, OpenAI CLIP names) -> ours. nn.MultiheadAttention's
# in_proj packs [q; k; v] like our qkv. class/positional embeddings gain leading dims.
CLIP_VIT_KEYS: dict[str, str] = {
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "ln_pre.weight": "pre_layernorm.weight",
    "ln_pre.bias": "pre_layernorm.bias",
    "transformer.resblocks.{}.ln_1.weight": "encoder.layers.{}.layer_norm1.weight",
    "transformer.resblocks.{}.ln_1.bias": "encoder.layers.{}.layer_norm1.bias",
    "transformer.resblocks.{}.attn.in_proj_weight": "encoder.layers.{}.self_attn.qkv.weight",
    "transformer.resblocks.{}.attn.in_proj_bias": "encoder.layers.{}.self_attn.qkv.bias",
    "transformer.resblocks.{}.attn.out_proj.weight": "encoder.layers.{}.self_attn.projection.weight",
    "transformer.resblocks.{}.attn.out_proj.bias": "encoder.layers.{}.self_attn.projection.bias",
    "transformer.resblocks.{}.ln_2.weight": "encoder.layers.{}.layer_norm2.weight",
    "transformer.resblocks.{}.ln_2.bias": "encoder.layers.{}.layer_norm2.bias",
    "transformer.resblocks.{}.mlp.c_fc.weight": "encoder.layers.{}.mlp.fc1.weight",
    "transformer.resblocks.{}.mlp.c_fc.bias": "encoder.layers.{}.mlp.fc1.bias",
    "transformer.resblocks.{}.mlp.c_proj.weight": "encoder.layers.{}.mlp.fc2.weight",
    "transformer.resblocks.{}.mlp.c_proj.bias": "encoder.layers.{}.mlp.fc2.bias",
}
# CLIP stores these without the batch (and token) dims that ours have.
CLIP_LEADING_DIMS = {"class_embedding": 2, "positional_embedding": 1}

# LAVIS ln_vision (root level) -> ours (VisionEncoder-relative).
LN_VISION_KEYS = {"ln_vision.weight": "post_layernorm.weight", "ln_vision.bias": "post_layernorm.bias"}


def _qformer_keys() -> dict[str, str]:
    """LAVIS ``Qformer.bert.*`` -> ours (QFormer-relative)."""
    keys = {
        "embeddings.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight": "layernorm.weight",
        "embeddings.LayerNorm.bias": "layernorm.bias",
    }
    for block in ("attention", "crossattention"):
        for proj in ("query", "key", "value"):
            for p in ("weight", "bias"):
                keys[f"encoder.layer.{{}}.{block}.self.{proj}.{p}"] = (
                    f"encoder.layer.{{}}.{block}.attention.{proj}.{p}"
                )
        for sub in ("dense", "LayerNorm"):
            for p in ("weight", "bias"):
                keys[f"encoder.layer.{{}}.{block}.output.{sub}.{p}"] = (
                    f"encoder.layer.{{}}.{block}.output.{sub}.{p}"
                )
    for ffn in ("", "_query"):
        for p in ("weight", "bias"):
            keys[f"encoder.layer.{{}}.intermediate{ffn}.dense.{p}"] = (
                f"encoder.layer.{{}}.intermediate{ffn}.dense.{p}"
            )
            for sub in ("dense", "LayerNorm"):
                keys[f"encoder.layer.{{}}.output{ffn}.{sub}.{p}"] = (
                    f"encoder.layer.{{}}.output{ffn}.{sub}.{p}"
                )
    return keys


QFORMER_KEYS: dict[str, str] = _qformer_keys()
# LAVIS keeps a persistent position_ids buffer; ours is rebuilt, so it is dropped silently.
QFORMER_IGNORED = {"embeddings.position_ids"}

# LAVIS root-level heads -> ours (Blip2Stage1 root). BERT's decoder bias is one tensor
# saved under two names (predictions.bias and predictions.decoder.bias).
LAVIS_HEAD_KEYS: dict[str, str] = {
    "vision_proj.weight": "vision_proj.weight",
    "vision_proj.bias": "vision_proj.bias",
    "text_proj.weight": "text_proj.weight",
    "text_proj.bias": "text_proj.bias",
    "itm_head.weight": "itm_head.weight",
    "itm_head.bias": "itm_head.bias",
    "temp": "temp",
    "Qformer.cls.predictions.transform.dense.weight": "lm_head.transform.dense.weight",
    "Qformer.cls.predictions.transform.dense.bias": "lm_head.transform.dense.bias",
    "Qformer.cls.predictions.transform.LayerNorm.weight": "lm_head.transform.LayerNorm.weight",
    "Qformer.cls.predictions.transform.LayerNorm.bias": "lm_head.transform.LayerNorm.bias",
    "Qformer.cls.predictions.decoder.weight": "lm_head.decoder.weight",
    "Qformer.cls.predictions.bias": "lm_head.decoder.bias",
}
LAVIS_DECODER_BIAS_ALIAS = "Qformer.cls.predictions.decoder.bias"

# Hugging Face Blip2* -> ours: prefix renames ({q} = the query encoder's prefix). A source
# ending in "." is a prefix, otherwise an exact key.
HF_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "{q}visual_encoder."),
    ("qformer.", "{q}qformer."),
    ("embeddings.", "{q}qformer.embeddings."),  # Blip2ForImageTextRetrieval's text embeddings
    ("query_tokens", "{q}query_tokens"),
    ("vision_projection.", "vision_proj."),
    ("text_projection.", "text_proj."),
    ("itm_head.", "itm_head."),
)
# Hugging Face InstructBlip* -> ours. Its Q-Former holds its own text embeddings and keeps
# BERT's embedding LayerNorm inside them (``qformer.embeddings.layernorm``), where ours and
# Blip2's have ``qformer.layernorm``.
HF_INSTRUCTBLIP_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "{q}visual_encoder."),
    ("qformer.embeddings.layernorm.", "{q}qformer.layernorm."),
    ("qformer.", "{q}qformer."),
    ("query_tokens", "{q}query_tokens"),
)


# -------------------------------------------------------------------------- helpers
_INDEX = re.compile(r"\.(\d+)(?=\.|$)")


def key_template(key: str) -> tuple[str, list[str]]:
    """``"blocks.3.attn.qkv.weight"`` -> ``("blocks.{}.attn.qkv.weight", ["3"])``."""
    return _INDEX.sub(".{}", key), _INDEX.findall(key)


def _invert(mapping: Mapping[str, str]) -> dict[str, str]:
    inverted = {v: k for k, v in mapping.items()}
    if len(inverted) != len(mapping):
        raise AssertionError("key map is not one-to-one")
    return inverted


def _rename(
    state_dict: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str],
    src_prefix: str,
    dst_prefix: str,
    out: Tensors,
    consumed: set[str],
    max_layers: int | None = None,
) -> None:
    """Rename every ``src_prefix + template`` key found in ``mapping`` into ``out``.

    Keys whose first layer index is ``>= max_layers`` are left unconsumed.
    """
    for key, tensor in state_dict.items():
        if not key.startswith(src_prefix) or key in consumed:
            continue
        template, indices = key_template(key[len(src_prefix) :])
        target = mapping.get(template)
        if target is None:
            continue
        if max_layers is not None and indices and int(indices[0]) >= max_layers:
            continue
        out[dst_prefix + target.format(*indices)] = tensor
        consumed.add(key)


def _unconsumed(state_dict: Mapping[str, torch.Tensor], consumed: set[str]) -> list[str]:
    return [k for k in state_dict if k not in consumed]


def summarize_keys(keys: Iterable[str]) -> str:
    """Compact listing of key names: per-layer keys collapse to ``layers.{0-38}.x``."""
    groups: dict[str, list[list[str]]] = defaultdict(list)
    for key in keys:
        template, indices = key_template(key)
        groups[template].append(indices)
    parts = []
    for template, index_lists in groups.items():
        if not index_lists[0]:
            parts.append(template)
            continue
        firsts = sorted({int(ix[0]) for ix in index_lists})
        span = f"{firsts[0]}-{firsts[-1]}" if len(firsts) > 1 else str(firsts[0])
        parts.append(template.replace("{}", "{" + span + "}", 1).replace("{}", "{*}"))
    return ", ".join(parts)


# ----------------------------------------------------------------------------- LAVIS
def _vision_arch(state_dict: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    if prefix + "cls_token" in state_dict or prefix + "blocks.0.attn.qkv.weight" in state_dict:
        return "eva_vit_g"
    if prefix + "conv1.weight" in state_dict or prefix + "transformer.resblocks.0.ln_1.weight" in state_dict:
        return "clip_vit_l"
    return None


def _lavis_vision_to_ours(
    state_dict: Mapping[str, torch.Tensor],
    src_prefix: str,
    dst_prefix: str,
    out: Tensors,
    consumed: set[str],
    num_layers: int | None,
) -> None:
    arch = _vision_arch(state_dict, src_prefix)
    if arch == "eva_vit_g":
        _rename(state_dict, EVA_VIT_KEYS, src_prefix, dst_prefix, out, consumed, num_layers)
        for key in list(state_dict):
            if not key.startswith(src_prefix):
                continue
            template, indices = key_template(key[len(src_prefix) :])
            if template != EVA_Q_BIAS or (num_layers is not None and int(indices[0]) >= num_layers):
                continue
            v_key = src_prefix + EVA_V_BIAS.format(*indices)
            q_bias, v_bias = state_dict[key], state_dict[v_key]
            # EVA has no key bias; HF's (and our) fused qkv.bias holds zeros there.
            out[dst_prefix + QKV_BIAS.format(*indices)] = torch.cat(
                [q_bias, torch.zeros_like(q_bias), v_bias]
            )
            consumed.update((key, v_key))
    elif arch == "clip_vit_l":
        renamed: Tensors = {}
        _rename(state_dict, CLIP_VIT_KEYS, src_prefix, "", renamed, consumed, num_layers)
        for clip_name, dims in CLIP_LEADING_DIMS.items():
            ours_name = CLIP_VIT_KEYS[clip_name]
            if ours_name in renamed:
                renamed[ours_name] = renamed[ours_name].reshape((1,) * dims + tuple(renamed[ours_name].shape))
        out.update({dst_prefix + k: v for k, v in renamed.items()})


def lavis_to_ours(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = QUERY_ENCODER_PREFIX,
    num_vision_layers: int | None = None,
) -> tuple[Tensors, list[str]]:
    """Convert a LAVIS state dict to our names; returns ``(ours, unconsumed_keys)``.

    Accepts a BLIP-2 checkpoint (``visual_encoder.*``, ``ln_vision.*``, ``Qformer.*``,
    heads) or a bare ViT file (``eva_vit_g.pth`` / ``clip_vit_L.pth``, no prefix).
    ``prefix`` is where the query encoder sits in the target model ("" for a bare
    :class:`QueryEncoder`). ``num_vision_layers`` drops ViT blocks beyond the model's
    depth (EVA-CLIP has 40, BLIP-2 uses 39) into the unconsumed list.
    """
    out: Tensors = {}
    consumed: set[str] = set()
    vision_dst = prefix + "visual_encoder."
    if _vision_arch(state_dict, "visual_encoder.") is not None:
        _lavis_vision_to_ours(state_dict, "visual_encoder.", vision_dst, out, consumed, num_vision_layers)
    elif _vision_arch(state_dict, "") is not None:  # eva_vit_g.pth / clip_vit_L.pth
        _lavis_vision_to_ours(state_dict, "", vision_dst, out, consumed, num_vision_layers)
    _rename(state_dict, LN_VISION_KEYS, "", vision_dst, out, consumed)
    _rename(state_dict, QFORMER_KEYS, "Qformer.bert.", prefix + "qformer.", out, consumed)
    consumed.update("Qformer.bert." + k for k in QFORMER_IGNORED if "Qformer.bert." + k in state_dict)
    if "query_tokens" in state_dict:
        out[prefix + "query_tokens"] = state_dict["query_tokens"]
        consumed.add("query_tokens")
    _rename(state_dict, LAVIS_HEAD_KEYS, "", "", out, consumed)
    if "temp" in out:
        out["temp"] = out["temp"].reshape(1)  # LAVIS: a 0-dim tensor; ours has one element
    if LAVIS_DECODER_BIAS_ALIAS in state_dict:
        out.setdefault("lm_head.decoder.bias", state_dict[LAVIS_DECODER_BIAS_ALIAS])
        consumed.add(LAVIS_DECODER_BIAS_ALIAS)
    unconsumed = _unconsumed(state_dict, consumed)
    logger.info("LAVIS -> ours: %d tensors converted, %d left over", len(out), len(unconsumed))
    if unconsumed:
        logger.info("LAVIS keys not converted: %s", summarize_keys(unconsumed))
    return out, unconsumed


def ours_to_lavis(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = QUERY_ENCODER_PREFIX,
    vision_arch: str = "eva_vit_g",
    vision_prefix: str = "visual_encoder.",
) -> tuple[Tensors, list[str]]:
    """Inverse of :func:`lavis_to_ours`; returns ``(lavis, unconsumed_keys)``.

    ``vision_prefix=""`` writes a bare ``eva_vit_g.pth``-style ViT (``ln_vision`` stays
    at the root, as in LAVIS). EVA's fused bias is split into ``q_bias`` / ``v_bias``;
    its key slice is dropped (it is zero for EVA weights; a warning says otherwise).
    """
    out: Tensors = {}
    consumed: set[str] = set()
    vision_src = prefix + "visual_encoder."
    vision_map = EVA_VIT_KEYS if vision_arch == "eva_vit_g" else CLIP_VIT_KEYS
    _rename(state_dict, _invert(vision_map), vision_src, vision_prefix, out, consumed)
    if vision_arch == "eva_vit_g":
        for key in list(state_dict):
            template, indices = (
                key_template(key[len(vision_src) :]) if key.startswith(vision_src) else ("", [])
            )
            if template != QKV_BIAS:
                continue
            q_bias, k_bias, v_bias = state_dict[key].chunk(3)
            if torch.count_nonzero(k_bias):
                logger.warning(
                    "%s has a non-zero key bias, which EVA's q_bias/v_bias cannot hold; dropped", key
                )
            out[vision_prefix + EVA_Q_BIAS.format(*indices)] = q_bias.clone()
            out[vision_prefix + EVA_V_BIAS.format(*indices)] = v_bias.clone()
            consumed.add(key)
    else:
        for clip_name, dims in CLIP_LEADING_DIMS.items():
            key = vision_prefix + clip_name
            if key in out:
                out[key] = out[key].reshape(out[key].shape[dims:])
    _rename(state_dict, _invert(LN_VISION_KEYS), vision_src, "", out, consumed)
    _rename(state_dict, _invert(QFORMER_KEYS), prefix + "qformer.", "Qformer.bert.", out, consumed)
    if prefix + "query_tokens" in state_dict:
        out["query_tokens"] = state_dict[prefix + "query_tokens"]
        consumed.add(prefix + "query_tokens")
    _rename(state_dict, _invert(LAVIS_HEAD_KEYS), "", "", out, consumed)
    if "temp" in out:
        out["temp"] = out["temp"].reshape(())
    if "Qformer.cls.predictions.bias" in out:
        out[LAVIS_DECODER_BIAS_ALIAS] = out["Qformer.cls.predictions.bias"]
    return out, _unconsumed(state_dict, consumed)


def eva_vit_to_ours(
    state_dict: Mapping[str, torch.Tensor], num_layers: int | None = None, prefix: str = ""
) -> tuple[Tensors, list[str]]:
    """A bare ``eva_vit_g.pth`` (or ``clip_vit_L.pth``) -> :class:`VisionEncoder` names under ``prefix``."""
    out: Tensors = {}
    consumed: set[str] = set()
    if _vision_arch(state_dict, "") is None:
        raise ValueError(
            "state dict has neither EVA (cls_token, blocks.*) nor CLIP (conv1, transformer.*) ViT keys"
        )
    _lavis_vision_to_ours(state_dict, "", prefix, out, consumed, num_layers)
    return out, _unconsumed(state_dict, consumed)


# ---------------------------------------------------------------------- Hugging Face
def _apply_prefixes(
    state_dict: Mapping[str, torch.Tensor], renames: Iterable[tuple[str, str]]
) -> tuple[Tensors, list[str]]:
    # Longest source first, so "qformer.embeddings." wins over "qformer." in the inverse.
    renames = sorted(renames, key=lambda pair: len(pair[0]), reverse=True)
    out: Tensors = {}
    unconsumed: list[str] = []
    for key, tensor in state_dict.items():
        for src, dst in renames:
            if key == src or (src.endswith(".") and key.startswith(src)):
                out[dst + key[len(src) :]] = tensor
                break
        else:
            unconsumed.append(key)
    return out, unconsumed


def _hf_prefixes(instructblip: bool) -> tuple[tuple[str, str], ...]:
    return HF_INSTRUCTBLIP_PREFIXES if instructblip else HF_PREFIXES


def hf_vision_qformer_to_ours(
    state_dict: Mapping[str, torch.Tensor], prefix: str = QUERY_ENCODER_PREFIX, instructblip: bool = False
) -> tuple[Tensors, list[str]]:
    """Hugging Face ``Blip2*`` (vision_model, qformer, query_tokens, retrieval heads) -> ours.

    Returns ``(ours, unconsumed_keys)``; the LLM parts (``language_projection``,
    ``language_model.*``) come back unconsumed for the LLM converter. The state dict of
    a bare ``Blip2VisionModel`` / ``Blip2QFormerModel`` needs no conversion: it loads
    into :class:`VisionEncoder` / :class:`QFormer` as it is. ``instructblip``: the names of
    ``InstructBlipForConditionalGeneration`` (:data:`HF_INSTRUCTBLIP_PREFIXES`).
    """
    renames = [(src, dst.format(q=prefix)) for src, dst in _hf_prefixes(instructblip)]
    return _apply_prefixes(state_dict, renames)


def ours_to_hf_vision_qformer(
    state_dict: Mapping[str, torch.Tensor], prefix: str = QUERY_ENCODER_PREFIX, instructblip: bool = False
) -> tuple[Tensors, list[str]]:
    """Inverse of :func:`hf_vision_qformer_to_ours`; ``temp`` and ``lm_head.*`` (no HF home) stay unconsumed."""
    renames = [(dst.format(q=prefix), src) for src, dst in _hf_prefixes(instructblip)]
    return _apply_prefixes(state_dict, renames)


def detect_source_format(state_dict: Mapping[str, torch.Tensor]) -> str:
    """ "lavis" or "hf" from the key names of a checkpoint (ValueError when neither)."""
    keys = list(state_dict)
    if any(k.startswith(("Qformer.", "visual_encoder.", "ln_vision.")) for k in keys) or _vision_arch(
        state_dict, ""
    ):
        return "lavis"
    if any(k.startswith(("vision_model.", "qformer.")) for k in keys):
        return "hf"
    raise ValueError(
        f"cannot tell whether these weights are LAVIS or Hugging Face BLIP-2 (first keys: {keys[:5]})"
    )


def vision_qformer_to_ours(
    state_dict: Mapping[str, torch.Tensor],
    prefix: str = QUERY_ENCODER_PREFIX,
    num_vision_layers: int | None = None,
) -> tuple[Tensors, list[str]]:
    """Convert a LAVIS or Hugging Face checkpoint (detected from its key names) to our names."""
    if detect_source_format(state_dict) == "lavis":
        return lavis_to_ours(state_dict, prefix=prefix, num_vision_layers=num_vision_layers)
    return hf_vision_qformer_to_ours(state_dict, prefix=prefix)


# ---------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What :func:`load_into` did, by tensor name."""

    missing: list[str] = field(default_factory=list)  # in the module, not in the state dict
    unexpected: list[str] = field(default_factory=list)  # in the state dict, not in the module
    resized: list[str] = field(default_factory=list)  # position embeddings interpolated
    skipped: list[str] = field(default_factory=list)  # shape mismatches ignored (strict_shapes=False)


def _alias_groups(module: nn.Module) -> dict[str, set[str]]:
    """Name -> all names of the same tensor (tied weights appear under several names)."""
    by_id: dict[int, set[str]] = defaultdict(set)
    for name, tensor in module.named_parameters(remove_duplicate=False):
        by_id[id(tensor)].add(name)
    for name, tensor in module.named_buffers(remove_duplicate=False):
        by_id[id(tensor)].add(name)
    return {name: names for names in by_id.values() for name in names}


def load_into(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    strict_shapes: bool = True,
    resize_position_embeddings: bool = True,
) -> LoadReport:
    """Copy ``state_dict`` into ``module`` (dtype follows the module) and report by name.

    * a tensor whose shape differs from the module's raises ``ValueError`` naming it
      (``strict_shapes=False``: skipped and listed in ``report.skipped``), except a ViT
      ``position_embedding`` of another resolution, which is interpolated bicubically
      (224-px weights into a 364-px model);
    * missing and unexpected keys are logged (collapsed per layer) and returned;
      a tied weight counts as present when any of its names is loaded.
    """
    own = module.state_dict()
    report = LoadReport()
    to_load: Tensors = {}
    for key, tensor in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
            continue
        target_shape = own[key].shape
        if tensor.shape != target_shape:
            if (
                resize_position_embeddings
                and key.endswith("embeddings.position_embedding")
                and tensor.dim() == 3
                and tensor.shape[-1] == target_shape[-1]
            ):
                tensor = interpolate_position_embedding(tensor, target_shape[1] - 1)
                report.resized.append(key)
            elif strict_shapes:
                raise ValueError(
                    f"shape mismatch for {key}: the checkpoint has {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target_shape)}"
                )
            else:
                report.skipped.append(key)
                continue
        to_load[key] = tensor
    aliases = _alias_groups(module)
    loaded = set(to_load)
    report.missing = [k for k in own if not (aliases.get(k, {k}) & loaded)]
    module.load_state_dict(to_load, strict=False)
    name = type(module).__name__
    logger.info("loaded %d tensors into %s", len(to_load), name)
    if report.missing:
        logger.warning(
            "%s: %d tensors missing from the checkpoint: %s",
            name,
            len(report.missing),
            summarize_keys(report.missing),
        )
    if report.unexpected:
        logger.warning(
            "%s: %d checkpoint tensors have no place in the model: %s",
            name,
            len(report.unexpected),
            summarize_keys(report.unexpected),
        )
    if report.skipped:
        logger.warning("%s: skipped tensors with mismatched shapes: %s", name, report.skipped)
    return report
