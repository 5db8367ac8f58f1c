"""Hugging Face causal LMs <-> :class:`~blip2_megatron.models.llm.ParallelCausalLM`.

Families, picked by ``config.json``'s ``model_type`` (:func:`llm_config_from_hf`): OPT,
LLaMA (Vicuna, LLaMA 2 and 3: GQA, RoPE scaling), Qwen2 (q/k/v biases, none on o_proj),
Mistral (sliding-window attention) and InternLM2. All but OPT are LLaMA maths
(``arch="llama"``) with flags; ``LLMConfig.family`` keeps the checkpoint layout.

Names are mapped by explicit key templates per family (``{}`` is the global layer index);
LLaMA, Qwen2 and Mistral share LLaMA's names, InternLM2 has its own
(``tok_embeddings``, ``attention.wqkv`` / ``attention.wo``, ``feed_forward.w1`` (gate) /
``w3`` (up) / ``w2`` (down), ``attention_norm`` / ``ffn_norm``, ``output``). InternLM2
fuses q, k and v into one ``attention.wqkv`` laid out per key/value group: for each of the
``num_key_value_heads`` groups its ``num_heads / num_key_value_heads`` query heads, then
its key head, then its value head. A whole group is one contiguous block of rows, so each
tensor-parallel rank reads the blocks of its own groups and splits them into our q/k/v.

Each rank reads only its tensor-parallel shard of every tensor, sliced along the
parameter's partition dimension (megatron-core marks it on each parameter as
``partition_dim``):

* rows (dim 0): q/k/v, ``fc1``, ``gate_proj``/``up_proj`` (whole heads / FFN blocks per rank),
  the token embedding and the head (vocabulary rows);
* columns (dim 1): ``o_proj``, ``fc2``, ``down_proj``;
* everything else (norms, OPT positions, row-parallel biases) is replicated.

The vocabulary is padded to a multiple of the TP size inside the model; padded rows load as
zeros and are dropped again on export.

Safetensors files are read with ``safe_open(...).get_slice(name)[rows]``, so a rank only
materialises its shard; ``.bin`` files are memory-mapped (``torch.load(mmap=True,
weights_only=True)``) and sliced. Every tensor's shape is checked against the model before it
is copied (the error names it), and missing / unexpected checkpoint keys are reported by name.
Nothing loads silently wrong: a checkpoint key the config does not call for (a bias the
config says is absent) is unexpected, a ``config.json`` key that is neither read nor known
to be irrelevant to the maths is refused, and a directory whose ``config.json`` describes
another model than ``model.cfg`` (sizes, biases, RoPE, window, tying) is refused by name.

Export (:func:`export_hf_state_dict`) gathers the TP shards back into full tensors under
Hugging Face names (fusing InternLM2's wqkv again); :func:`save_hf_llm` writes a directory
that ``transformers`` loads (OPT, LLaMA, Qwen2, Mistral) or, for InternLM2, the layout its
own published checkpoints have (``transformers`` ships no InternLM2 model).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from blip2_megatron.config import ConfigError, LLMConfig
from blip2_megatron.config.model import LLM_ACTIVATIONS
from blip2_megatron.io import (
    CheckpointMismatchError,
    UnsafeCheckpointError,
    iter_checkpoint_files,
    load_state_dict_file,
)
from blip2_megatron.models.llm import ParallelCausalLM, gather_from_tp_ranks
from blip2_megatron.models.quantize import dequantize_bnb_tensors, mode_from_quantization_config
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- key templates
# Ours (relative to a DecoderLayer) -> Hugging Face, "{}" = global layer index.
OPT_LAYER_KEYS = {
    "self_attn.q_proj.weight": "model.decoder.layers.{}.self_attn.q_proj.weight",
    "self_attn.q_proj.bias": "model.decoder.layers.{}.self_attn.q_proj.bias",
    "self_attn.k_proj.weight": "model.decoder.layers.{}.self_attn.k_proj.weight",
    "self_attn.k_proj.bias": "model.decoder.layers.{}.self_attn.k_proj.bias",
    "self_attn.v_proj.weight": "model.decoder.layers.{}.self_attn.v_proj.weight",
    "self_attn.v_proj.bias": "model.decoder.layers.{}.self_attn.v_proj.bias",
    "self_attn.o_proj.weight": "model.decoder.layers.{}.self_attn.out_proj.weight",
    "self_attn.o_proj.bias": "model.decoder.layers.{}.self_attn.out_proj.bias",
    "input_layernorm.weight": "model.decoder.layers.{}.self_attn_layer_norm.weight",
    "input_layernorm.bias": "model.decoder.layers.{}.self_attn_layer_norm.bias",
    "post_attention_layernorm.weight": "model.decoder.layers.{}.final_layer_norm.weight",
    "post_attention_layernorm.bias": "model.decoder.layers.{}.final_layer_norm.bias",
    "mlp.fc1.weight": "model.decoder.layers.{}.fc1.weight",
    "mlp.fc1.bias": "model.decoder.layers.{}.fc1.bias",
    "mlp.fc2.weight": "model.decoder.layers.{}.fc2.weight",
    "mlp.fc2.bias": "model.decoder.layers.{}.fc2.bias",
}
# Ours (top level) -> Hugging Face.
OPT_MODEL_KEYS = {
    "embed_tokens.weight": "model.decoder.embed_tokens.weight",
    "embed_positions.weight": "model.decoder.embed_positions.weight",
    "norm.weight": "model.decoder.final_layer_norm.weight",
    "norm.bias": "model.decoder.final_layer_norm.bias",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_LAYER_KEYS = {
    "self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
    "self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "self_attn.o_proj.bias": "model.layers.{}.self_attn.o_proj.bias",
    "input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
}
LLAMA_MODEL_KEYS = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# InternLM2: q, k and v of one layer all map to the fused wqkv (see FUSED_QKV).
INTERNLM2_LAYER_KEYS = {
    "self_attn.q_proj.weight": "model.layers.{}.attention.wqkv.weight",
    "self_attn.k_proj.weight": "model.layers.{}.attention.wqkv.weight",
    "self_attn.v_proj.weight": "model.layers.{}.attention.wqkv.weight",
    "self_attn.q_proj.bias": "model.layers.{}.attention.wqkv.bias",
    "self_attn.k_proj.bias": "model.layers.{}.attention.wqkv.bias",
    "self_attn.v_proj.bias": "model.layers.{}.attention.wqkv.bias",
    "self_attn.o_proj.weight": "model.layers.{}.attention.wo.weight",
    "self_attn.o_proj.bias": "model.layers.{}.attention.wo.bias",
    "input_layernorm.weight": "model.layers.{}.attention_norm.weight",
    "post_attention_layernorm.weight": "model.layers.{}.ffn_norm.weight",
    "mlp.gate_proj.weight": "model.layers.{}.feed_forward.w1.weight",
    "mlp.up_proj.weight": "model.layers.{}.feed_forward.w3.weight",
    "mlp.down_proj.weight": "model.layers.{}.feed_forward.w2.weight",
}
INTERNLM2_MODEL_KEYS = {
    "embed_tokens.weight": "model.tok_embeddings.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
}
# T5 (LLMConfig arch "t5"): layer keys per stack ("{}" = the layer index within the stack).
_T5_ATTENTION = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
T5_ENCODER_LAYER_KEYS = {
    **{
        f"self_attn.{ours}.weight": f"encoder.block.{{}}.layer.0.SelfAttention.{hf}.weight"
        for ours, hf in _T5_ATTENTION.items()
    },
    "self_attn.relative_attention_bias.weight": "encoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight",
    "input_layernorm.weight": "encoder.block.{}.layer.0.layer_norm.weight",
    "mlp.gate_proj.weight": "encoder.block.{}.layer.1.DenseReluDense.wi_0.weight",
    "mlp.up_proj.weight": "encoder.block.{}.layer.1.DenseReluDense.wi_1.weight",
    "mlp.down_proj.weight": "encoder.block.{}.layer.1.DenseReluDense.wo.weight",
    "post_attention_layernorm.weight": "encoder.block.{}.layer.1.layer_norm.weight",
}
T5_DECODER_LAYER_KEYS = {
    **{
        f"self_attn.{ours}.weight": f"decoder.block.{{}}.layer.0.SelfAttention.{hf}.weight"
        for ours, hf in _T5_ATTENTION.items()
    },
    "self_attn.relative_attention_bias.weight": "decoder.block.{}.layer.0.SelfAttention.relative_attention_bias.weight",
    "input_layernorm.weight": "decoder.block.{}.layer.0.layer_norm.weight",
    **{
        f"cross_attn.{ours}.weight": f"decoder.block.{{}}.layer.1.EncDecAttention.{hf}.weight"
        for ours, hf in _T5_ATTENTION.items()
    },
    "cross_attention_layernorm.weight": "decoder.block.{}.layer.1.layer_norm.weight",
    "mlp.gate_proj.weight": "decoder.block.{}.layer.2.DenseReluDense.wi_0.weight",
    "mlp.up_proj.weight": "decoder.block.{}.layer.2.DenseReluDense.wi_1.weight",
    "mlp.down_proj.weight": "decoder.block.{}.layer.2.DenseReluDense.wo.weight",
    "post_attention_layernorm.weight": "decoder.block.{}.layer.2.layer_norm.weight",
}
T5_MODEL_KEYS = {
    "embed_tokens.weight": "shared.weight",
    "encoder.norm.weight": "encoder.final_layer_norm.weight",
    "decoder.norm.weight": "decoder.final_layer_norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# T5's relative position table exists in the first layer of each stack only.
T5_FIRST_LAYER_ONLY = "self_attn.relative_attention_bias.weight"
# family (LLMConfig.hf_family) -> (top-level keys, layer keys)
KEY_MAPS = {
    "opt": (OPT_MODEL_KEYS, OPT_LAYER_KEYS),
    "llama": (LLAMA_MODEL_KEYS, LLAMA_LAYER_KEYS),
    "qwen2": (LLAMA_MODEL_KEYS, LLAMA_LAYER_KEYS),
    "mistral": (LLAMA_MODEL_KEYS, LLAMA_LAYER_KEYS),
    "internlm2": (INTERNLM2_MODEL_KEYS, INTERNLM2_LAYER_KEYS),
    "t5": (T5_MODEL_KEYS, T5_ENCODER_LAYER_KEYS),
}
# Layer keys of the stacks of an encoder-decoder family ("" = a decoder-only model's layers).
STACK_LAYER_KEYS = {"t5": {"encoder": T5_ENCODER_LAYER_KEYS, "decoder": T5_DECODER_LAYER_KEYS}}
# Checkpoint keys of families whose top-level names are not under "model." (so a bare
# checkpoint is not recognised by a missing prefix).
UNPREFIXED_FAMILIES = ("t5",)
# Our projections that share one fused Hugging Face tensor, in the order of its per-group blocks.
FUSED_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")

# Checkpoint entries that are not weights: older LLaMA / Vicuna (and InternLM2) files store
# the RoPE frequencies, which we recompute.
# T5 checkpoints saved from .bin files repeat the shared embedding under each stack's name.
IGNORED_HF_KEYS = (
    re.compile(r"model\.layers\.\d+\.(self_attn|attention)\.rotary_emb\.inv_freq"),
    re.compile(r"(encoder|decoder)\.embed_tokens\.weight"),
)
# Our parameters whose rows are vocabulary entries (padded to a multiple of the TP size).
VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")
# Prefixes of a *ForCausalLM checkpoint's keys outside its base model (the head).
HEAD_PREFIXES = ("lm_head.", "output.")


# --------------------------------------------------------------------------- configs
# config.json keys that describe nothing of the decoder's maths: bookkeeping, generation
# defaults (a job sets its own), initialisation (weights are loaded), transformers and
# remote-code switches, and LLaMA-2's pretraining_tp (the same maths computed in slices).
# Every other key is read by a family below or refused by name.
HF_METADATA_KEYS = frozenset(
    {
        "_name_or_path",
        "_attn_implementation_autoset",
        "add_cross_attention",
        "architectures",
        "attn_implementation",
        "auto_map",
        "bad_words_ids",
        "begin_suppress_tokens",
        "chunk_size_feed_forward",
        "cross_attention_hidden_size",
        "decoder_start_token_id",
        "diversity_penalty",
        "do_sample",
        "dtype",
        "early_stopping",
        "encoder_no_repeat_ngram_size",
        "exponential_decay_length_penalty",
        "finetuning_task",
        "forced_bos_token_id",
        "forced_eos_token_id",
        "id2label",
        "init_std",
        "initializer_range",
        "is_decoder",
        "is_encoder_decoder",
        "label2id",
        "length_penalty",
        "max_length",
        "max_sequence_length",  # old LLaMA conversions: a tokenizer hint, max_position_embeddings rules
        "min_length",
        "model_type",
        "no_repeat_ngram_size",
        "num_beam_groups",
        "num_beams",
        "num_return_sequences",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "prefix",
        "pretraining_tp",
        "problem_type",
        "pruned_heads",
        "remove_invalid_values",
        "repetition_penalty",
        "return_dict",
        "return_dict_in_generate",
        "sep_token_id",
        "suppress_tokens",
        "task_specific_params",
        "temperature",
        "tf_legacy_loss",
        "tie_encoder_decoder",
        "tokenizer_class",
        "top_k",
        "top_p",
        "torch_dtype",
        "torchscript",
        "transformers_version",
        "typical_p",
        "use_bfloat16",
        "use_cache",
    }
)
# RoPE types we model -> the rope_parameters / rope_scaling keys each one reads.
ROPE_PARAMETER_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
_ABSENT = object()


class _HFConfigReader:
    """A ``config.json`` dict read key by key, so that the keys nobody read can be named at the end."""

    def __init__(self, hf: Mapping[str, Any]):
        self.hf = dict(hf)
        self.model_type = self.hf.get("model_type")
        self.read = set(HF_METADATA_KEYS)

    def get(self, key: str, default: Any = _ABSENT) -> Any:
        """The value of ``key`` (``None`` if null); ``default`` when absent (required without one)."""
        self.read.add(key)
        if key in self.hf:
            return self.hf[key]
        if default is _ABSENT:
            raise ConfigError(f"{self.model_type} config.json has no {key!r}")
        return default

    def size(self, key: str) -> int:
        value = self.get(key)
        if value is None:
            raise ConfigError(f"{self.model_type} config.json: {key} is null")
        return value

    def require(self, key: str, expected: Any, default: Any, what: str) -> None:
        """Refuse ``key`` unless it (or its default when absent) is ``expected``."""
        value = self.get(key, default)
        if value != expected:
            raise ConfigError(f"{self.model_type} config.json {key}={value!r} ({what}) is not supported")

    def dropout(self, *keys: str) -> None:
        """Dropout rates: our decoders have none, which only a trained LLM could tell."""
        for key in keys:
            rate = self.get(key, 0.0) or 0.0
            if rate:
                logger.info(
                    "%s config.json %s=%s: not modelled (our decoder has no dropout); "
                    "it only matters when the LLM trains (llm.freeze=false)",
                    self.model_type,
                    key,
                    rate,
                )

    def check_all_read(self) -> None:
        left = {key: self.hf[key] for key in sorted(self.hf) if key not in self.read}
        if left:
            raise ConfigError(
                f"{self.model_type} config.json keys not modelled: {left}; a key that does not change the "
                "decoder's maths can be removed from config.json"
            )


def _token_ids(
    hf: _HFConfigReader,
    overrides: Mapping[str, Any],
    eos_default: int | None = None,
    pad_default: str = "eos",
) -> dict[str, Any]:
    """bos / eos / pad ids. A null pad becomes the eos (``pad_default="eos"``, as transformers'
    generate does) or 0 (``"zero"``: LLaMA's <unk>, the rule for LLaMA checkpoints here)."""
    bos = hf.get("bos_token_id", None)
    eos = hf.get("eos_token_id", None)
    pad = hf.get("pad_token_id", None)
    if isinstance(eos, list):
        eos = eos[0]  # several end tokens (LLaMA 3 instruct): the first ends a BLIP-2 text
    if eos is None:
        eos = eos_default
    if eos is None and "eos_token_id" not in overrides:
        raise ConfigError(f"{hf.model_type} config.json has no eos_token_id; set llm.eos_token_id")
    if pad is None:
        pad = 0 if pad_default == "zero" else overrides.get("eos_token_id", eos)
    return dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


def _rope_fields(hf: _HFConfigReader) -> dict[str, Any]:
    """RoPE base and scaling from ``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf.get("rope_parameters", None) or hf.get("rope_scaling", None) or {})
    top_theta = hf.get("rope_theta", None)
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = top_theta if top_theta is not None else 10000.0
    elif top_theta is not None and float(top_theta) != float(theta):
        raise ConfigError(
            f"{hf.model_type} config.json: rope_theta={top_theta} but rope_parameters say {theta}"
        )
    names = {params.pop(key) for key in ("rope_type", "type") if key in params}
    if len(names) > 1:
        raise ConfigError(f"{hf.model_type} config.json: the RoPE parameters name two types {sorted(names)}")
    rope_type = names.pop() if names else "default"
    if rope_type not in ROPE_PARAMETER_KEYS:
        raise ConfigError(
            f"rope type {rope_type!r} (rope_parameters / rope_scaling) is not supported; "
            f"supported: {list(ROPE_PARAMETER_KEYS)}"
        )
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError(
            f"{hf.model_type} config.json: partial_rotary_factor={partial} is not supported (1.0)"
        )
    wanted = ROPE_PARAMETER_KEYS[rope_type]
    missing = [key for key in wanted if params.get(key) is None]
    unknown = sorted(set(params) - set(wanted))
    if missing or unknown:
        raise ConfigError(
            f"rope type {rope_type!r}: {'missing ' + str(missing) if missing else ''}"
            f"{' and ' if missing and unknown else ''}{'not modelled ' + str(unknown) if unknown else ''} "
            f"(it reads {list(wanted)})"
        )
    fields: dict[str, Any] = dict(rope_theta=float(theta), rope_type=rope_type)
    if "factor" in params:
        fields["rope_factor"] = float(params["factor"])
    if rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_positions=int(params["original_max_position_embeddings"]),
        )
    return fields


def _llama_maths(hf: _HFConfigReader, family: str, max_positions: int) -> dict[str, Any]:
    """The fields every LLaMA-maths family reads the same way (sizes, norm, RoPE, tying)."""
    hf.require("hidden_act", "silu", "silu", "the SwiGLU activation is SiLU")
    hidden, heads = hf.size("hidden_size"), hf.size("num_attention_heads")
    head_dim = hf.get("head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(
            f"{hf.model_type} config.json: head_dim={head_dim} x num_attention_heads={heads} != "
            f"hidden_size={hidden} is not supported"
        )
    positions = hf.get("max_position_embeddings", max_positions)
    return dict(
        arch="llama",
        family=family,
        vocab_size=hf.size("vocab_size"),
        hidden_size=hidden,
        num_layers=hf.size("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", None) or heads,
        intermediate_size=hf.size("intermediate_size"),
        max_position_embeddings=positions if positions is not None else max_positions,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        **_rope_fields(hf),
    )


def _opt_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    hidden = hf.size("hidden_size")
    hf.require("do_layer_norm_before", True, True, "post-LN, OPT-350M")
    if hf.get("word_embed_proj_dim", hidden) != hidden:
        raise ConfigError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    hf.require("activation_function", "relu", "relu", "OPT's FFN is ReLU")
    hf.require("layer_norm_elementwise_affine", True, True, "LayerNorm without weights")
    hf.require("_remove_final_layer_norm", False, False, "no final LayerNorm")
    hf.dropout("dropout", "attention_dropout", "activation_dropout", "layerdrop")
    # OPT's eos "</s>" is not where BLIP-2 captions end ("\n", LLMConfig's default 50118).
    hf.get("eos_token_id", None)
    bos, pad = hf.get("bos_token_id", 2), hf.get("pad_token_id", 1)
    return dict(
        arch="opt",
        vocab_size=hf.size("vocab_size"),
        hidden_size=hidden,
        num_layers=hf.size("num_hidden_layers"),
        num_heads=hf.size("num_attention_heads"),
        intermediate_size=hf.size("ffn_dim"),
        max_position_embeddings=hf.size("max_position_embeddings"),
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT configs do not store it
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        attention_bias=hf.get("enable_bias", True),
        bos_token_id=2 if bos is None else bos,
        pad_token_id=1 if pad is None else pad,
    )


def _llama_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    hf.require("mlp_bias", False, False, "biases in the MLP")
    hf.dropout("attention_dropout")
    fields = _llama_maths(hf, "", max_positions=2048)  # family "" = arch llama's own layout
    ids = _token_ids(hf, overrides, eos_default=2, pad_default="zero")
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = 1  # LLaMA's "<s>"
    return dict(fields, attention_bias=hf.get("attention_bias", False), **ids)  # q/k/v and o_proj alike


def _qwen2_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    if hf.get("use_sliding_window", False):
        raise ConfigError(
            "qwen2 config.json use_sliding_window=true (a window on the layers from max_window_layers on) "
            "is not supported"
        )
    # Read but without effect: transformers applies them only with use_sliding_window.
    hf.get("sliding_window", None)
    hf.get("max_window_layers", None)
    layer_types = hf.get("layer_types", None) or []
    windowed = sorted({kind for kind in layer_types if kind != "full_attention"})
    if windowed:
        raise ConfigError(f"qwen2 config.json layer_types {windowed} are not supported (full_attention)")
    hf.dropout("attention_dropout")
    fields = _llama_maths(hf, "qwen2", max_positions=32768)
    # Qwen2's attention always has q/k/v biases and no o_proj bias (no config key says so).
    return dict(fields, attention_bias=True, o_proj_bias=False, **_token_ids(hf, overrides))


def _mistral_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    hf.dropout("attention_dropout")
    fields = _llama_maths(hf, "mistral", max_positions=4096 * 32)
    window = hf.get("sliding_window", 4096)  # MistralConfig's default when absent; null = no window
    return dict(fields, attention_bias=False, sliding_window=window or 0, **_token_ids(hf, overrides))


def _internlm2_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    fields = _llama_maths(hf, "internlm2", max_positions=2048)
    bias = hf.get("bias", True)  # InternLM2Config's default; published checkpoints say false
    return dict(fields, attention_bias=bias, o_proj_bias=bias, **_token_ids(hf, overrides))


def _t5_fields(hf: _HFConfigReader, overrides: Mapping[str, Any]) -> dict[str, Any]:
    proj = hf.get("feed_forward_proj", "relu")
    hf.get("is_gated_act", None)  # derived from feed_forward_proj
    # transformers reads "gated-gelu" as GELU's tanh form; a saved dense_act_fn wins (LAVIS sets "gelu").
    default_act = "gelu_new" if proj == "gated-gelu" else proj.split("-")[-1]
    activation = hf.get("dense_act_fn", default_act)
    if not proj.startswith("gated-") or activation not in LLM_ACTIVATIONS or activation == "relu":
        raise ConfigError(
            f"t5 config.json feed_forward_proj={proj!r} (dense_act_fn={activation!r}) is not supported: T5 "
            "v1.1 / FlanT5's gated GELU FFN ('gated-gelu') is; T5 v1.0's ReLU FFN is not"
        )
    untied = not hf.get("tie_word_embeddings", False)
    # transformers 5 writes tie_word_embeddings=true for every T5 and says with this key whether
    # the head is scaled as v1.0's tied head is; older files say it with tie_word_embeddings alone.
    if hf.get("scale_decoder_outputs", not untied):
        raise ConfigError(
            "t5 config.json describes T5 v1.0's head (decoder outputs scaled by d_model**-0.5, tied to the "
            "embedding): not supported; T5 v1.1 / FlanT5 (untied, unscaled) is"
        )
    hf.dropout("dropout_rate", "classifier_dropout")
    hf.get("initializer_factor", None)
    hf.get("n_positions", None)  # old configs: a tokenizer hint, relative positions have no limit
    hf.get("output_past", None)
    layers = hf.size("num_layers")
    ids = _token_ids(hf, overrides, eos_default=1)
    return dict(
        arch="t5",
        family="t5",
        vocab_size=hf.size("vocab_size"),
        hidden_size=hf.size("d_model"),
        num_layers=layers,
        num_decoder_layers=hf.get("num_decoder_layers", None) or layers,
        num_heads=hf.size("num_heads"),
        head_dim_override=hf.size("d_kv"),
        intermediate_size=hf.size("d_ff"),
        hidden_act=activation,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        max_position_embeddings=512,  # what T5 was trained at; relative positions are not bounded
        norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=False,
        attention_bias=False,
        bos_token_id=None,
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"] if hf.hf.get("pad_token_id") is not None else 0,
    )


# model_type -> reader of its config.json
HF_CONFIG_READERS = {
    "opt": _opt_fields,
    "llama": _llama_fields,
    "qwen2": _qwen2_fields,
    "mistral": _mistral_fields,
    "internlm2": _internlm2_fields,
    "t5": _t5_fields,
}


def llm_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LLMConfig:
    """An :class:`LLMConfig` from a Hugging Face ``config.json`` dict (any family of :data:`HF_CONFIG_READERS`).

    ``overrides`` set any other LLMConfig field (``tp``, ``pp``, ``dtype``, ``weights`` ...).
    For OPT the end-of-text id is not taken from the checkpoint: BLIP-2 ends captions with
    "\\n" (LLMConfig's default, 50118), not OPT's "</s>"; override ``eos_token_id`` to change it.
    Read strictly: variants we do not implement (OPT-350M's post-LN and projections, RoPE
    types other than default / linear / dynamic / llama3, MLP biases, non-SiLU activations,
    Qwen2's sliding window) are refused with the offending key named, and so is any key
    that is neither read nor listed in :data:`HF_METADATA_KEYS`. A directory transformers
    saved quantized (``quantization_config``) gives ``quantize`` its mode (int8 / nf4).
    """
    hf = _HFConfigReader(hf_config)
    reader = HF_CONFIG_READERS.get(hf.model_type)
    if reader is None:
        raise ConfigError(
            f"model_type {hf.model_type!r} is not supported; supported: {sorted(HF_CONFIG_READERS)}"
        )
    fields = reader(hf, overrides)
    quantization = hf.get("quantization_config", None)
    if quantization:
        fields["quantize"] = mode_from_quantization_config(quantization)
    hf.check_all_read()
    fields.update(overrides)
    return LLMConfig(**fields)


# LLMConfig keys that fix what the weights compute (a directory's config.json must agree on
# them), with how to read each one's effective value.
MATHS_FIELDS = {
    "arch": lambda c: c.arch,
    "family": lambda c: c.hf_family,
    "vocab_size": lambda c: c.vocab_size,
    "hidden_size": lambda c: c.hidden_size,
    "num_layers": lambda c: c.num_layers,
    "num_heads": lambda c: c.num_heads,
    "head_dim": lambda c: c.head_dim,
    "decoder_layers": lambda c: c.decoder_layers if c.is_encoder_decoder else None,
    "relative_attention": lambda c: (
        (c.relative_attention_num_buckets, c.relative_attention_max_distance)
        if c.is_encoder_decoder
        else None
    ),
    "num_kv_heads": lambda c: c.kv_heads,
    "intermediate_size": lambda c: c.intermediate_size,
    "norm_eps": lambda c: c.norm_eps,
    "rope_theta": lambda c: c.rope_theta,
    "rope_type": lambda c: c.rope_type,
    "sliding_window": lambda c: c.sliding_window,
    "tie_word_embeddings": lambda c: c.tie_word_embeddings,
    "attention_bias": lambda c: c.attention_bias,
    "o_proj_bias": lambda c: c.has_o_proj_bias,
}


def _maths(cfg: LLMConfig) -> dict[str, Any]:
    fields = {name: value(cfg) for name, value in MATHS_FIELDS.items()}
    if cfg.rope_type != "default":
        fields["rope_factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        fields.update(
            rope_low_freq_factor=cfg.rope_low_freq_factor,
            rope_high_freq_factor=cfg.rope_high_freq_factor,
            rope_original_max_positions=cfg.rope_original_max_positions,
        )
    if cfg.rope_type == "dynamic" or cfg.arch == "opt":  # the RoPE limit / the position table
        fields["max_position_embeddings"] = cfg.max_position_embeddings
    return fields


def check_hf_config_matches(cfg: LLMConfig, hf_config: Mapping[str, Any], where: str | Path) -> None:
    """Raise :class:`ConfigError` naming every maths field where ``cfg`` and a ``config.json`` differ,
    or a quantized directory's mode where ``llm.quantize`` is another."""
    stored = llm_config_from_hf(hf_config)
    theirs = _maths(stored)
    ours = _maths(cfg)
    differ = {name: (ours.get(name), theirs.get(name)) for name in sorted(set(ours) | set(theirs))}
    differ = {name: pair for name, pair in differ.items() if pair[0] != pair[1]}
    if differ:
        listed = ", ".join(f"llm.{name}={a!r} but {b!r} there" for name, (a, b) in differ.items())
        raise ConfigError(
            f"{where}/config.json describes another model than the config: {listed} "
            "(set these llm.* fields, or use the flavour that matches the checkpoint)"
        )
    if stored.quantize != "none" and cfg.quantize != stored.quantize:
        raise ConfigError(
            f"{where} holds bitsandbytes {stored.quantize} weights (quantization_config in its config.json), "
            f"but llm.quantize={cfg.quantize!r}: set llm.quantize={stored.quantize} (--quantize "
            f"{stored.quantize}) to load them"
        )


def _rope_parameters(cfg: LLMConfig) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type != "default":
        params["factor"] = cfg.rope_factor
    if cfg.rope_type == "llama3":
        params.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_positions,
        )
    return params


def _refuse_unless(condition: bool, cfg: LLMConfig, what: str) -> None:
    if not condition:
        raise ConfigError(f"cannot write llm.family={cfg.hf_family!r} as a Hugging Face config: {what}")


def hf_config_dict(cfg: LLMConfig) -> dict[str, Any]:
    """A ``config.json`` dict describing ``cfg`` in its family's layout.

    transformers' OPTConfig / LlamaConfig / Qwen2Config / MistralConfig; for InternLM2 the
    keys of its published ``config.json`` (transformers ships no InternLM2 class). A setting
    the family's config cannot express (a sliding window in LLaMA, an o_proj bias in Qwen2)
    is a :class:`ConfigError` naming it.
    """
    import transformers

    family = cfg.hf_family
    if family == "opt":
        hf = transformers.OPTConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            ffn_dim=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            word_embed_proj_dim=cfg.hidden_size,
            do_layer_norm_before=True,
            enable_bias=cfg.attention_bias,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.bos_token_id,  # OPT's "</s>" is both; BLIP-2's "\n" end is a generation setting
            pad_token_id=cfg.pad_token_id,
        )
        hf.architectures = ["OPTForCausalLM"]
        return hf.to_dict()
    if family == "internlm2":
        return _internlm2_config_dict(cfg)
    if family == "t5":
        return _t5_config_dict(cfg)
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters=_rope_parameters(cfg),
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
    )
    if family == "llama":
        _refuse_unless(
            not cfg.sliding_window, cfg, f"llm.sliding_window={cfg.sliding_window} (LLaMA has none)"
        )
        _refuse_unless(
            cfg.has_o_proj_bias == cfg.attention_bias,
            cfg,
            f"llm.o_proj_bias={cfg.o_proj_bias} differs from llm.attention_bias (one switch in LlamaConfig)",
        )
        hf = transformers.LlamaConfig(**common, attention_bias=cfg.attention_bias)
        hf.architectures = ["LlamaForCausalLM"]
    elif family == "qwen2":
        _refuse_unless(not cfg.sliding_window, cfg, f"llm.sliding_window={cfg.sliding_window} (not modelled)")
        _refuse_unless(
            cfg.attention_bias and not cfg.has_o_proj_bias,
            cfg,
            f"llm.attention_bias={cfg.attention_bias}, o_proj bias {cfg.has_o_proj_bias} "
            "(Qwen2 has q/k/v biases and no o_proj bias)",
        )
        hf = transformers.Qwen2Config(**common)
        hf.architectures = ["Qwen2ForCausalLM"]
    elif family == "mistral":
        _refuse_unless(
            not cfg.attention_bias and not cfg.has_o_proj_bias,
            cfg,
            f"llm.attention_bias={cfg.attention_bias} (Mistral has no biases)",
        )
        hf = transformers.MistralConfig(
            **common, head_dim=cfg.head_dim, sliding_window=cfg.sliding_window or None
        )
        hf.architectures = ["MistralForCausalLM"]
    else:
        raise ConfigError(f"llm.family={family!r} has no Hugging Face config writer")
    return hf.to_dict()


# InternLM2's published checkpoints name their remote code here; the files themselves
# (configuration_internlm2.py, modeling_internlm2.py) are InternLM2's, not ours.
INTERNLM2_AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def _internlm2_config_dict(cfg: LLMConfig) -> dict[str, Any]:
    _refuse_unless(
        not cfg.sliding_window, cfg, f"llm.sliding_window={cfg.sliding_window} (InternLM2 has none)"
    )
    _refuse_unless(
        cfg.has_o_proj_bias == cfg.attention_bias,
        cfg,
        f"llm.o_proj_bias={cfg.o_proj_bias} differs from llm.attention_bias (one 'bias' key in InternLM2)",
    )
    _refuse_unless(
        cfg.rope_type in ("default", "linear", "dynamic"),
        cfg,
        f"llm.rope_type={cfg.rope_type!r} (InternLM2's code knows linear and dynamic scaling only)",
    )
    scaling = None if cfg.rope_type == "default" else {"type": cfg.rope_type, "factor": cfg.rope_factor}
    return {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": dict(INTERNLM2_AUTO_MAP),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.norm_eps,
        "bias": cfg.attention_bias,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
    }


def _t5_config_dict(cfg: LLMConfig) -> dict[str, Any]:
    """transformers' T5Config for T5 v1.1 / FlanT5 (gated FFN, untied and unscaled head).

    The activation is written as ``dense_act_fn``: ``gated-gelu`` names the tanh GELU, and
    LAVIS's exact GELU is only expressible this way.
    """
    import transformers

    gated = "gated-gelu" if cfg.activation == "gelu_new" else f"gated-{cfg.activation}"
    hf = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.hidden_size,
        d_kv=cfg.head_dim,
        d_ff=cfg.intermediate_size,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.decoder_layers,
        num_heads=cfg.num_heads,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.norm_eps,
        feed_forward_proj=gated,
        tie_word_embeddings=False,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=cfg.eos_token_id,
        decoder_start_token_id=cfg.pad_token_id,
        dropout_rate=0.0,
    )
    hf.dense_act_fn = cfg.activation
    hf.architectures = ["T5ForConditionalGeneration"]
    return hf.to_dict()


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- reading tensors
class HFTensors:
    """The tensors of a Hugging Face checkpoint, read lazily and in slices.

    Built from a model directory (safetensors or ``.bin`` files, sharded or not) or from an
    in-memory state dict. Keys are normalised to the ``model.``-prefixed names of
    ``*ForCausalLM`` (checkpoints of the bare ``OPTModel`` / ``LlamaModel`` / ``InternLM2Model``
    lack the prefix).
    """

    def __init__(self, family: str = "") -> None:
        self._location: dict[str, tuple[Any, str]] = {}  # our key -> (container, key inside it)
        self._handles: list[Any] = []
        self._prefix_bare = family not in UNPREFIXED_FAMILIES

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor], family: str = "") -> HFTensors:
        """``family``: the checkpoint's ``LLMConfig.hf_family`` (T5's names have no ``model.`` prefix)."""
        source = cls(family)
        for name in tensors:
            source._add(name, tensors, name)
        return source

    @classmethod
    def from_directory(cls, model_dir: str | Path, family: str = "") -> HFTensors:
        from safetensors import safe_open

        source = cls(family)
        for path in iter_checkpoint_files(model_dir):
            if path.suffix == ".safetensors":
                handle = safe_open(str(path), framework="pt", device="cpu")
                source._handles.append(handle)
                for name in handle.keys():
                    source._add(name, handle, name)
            else:
                tensors = _load_bin_mmap(path)
                for name in tensors:
                    source._add(name, tensors, name)
        logger.info("%s: %d tensors in the checkpoint", model_dir, len(source._location))
        return source

    def _add(self, name: str, container: Any, key: str) -> None:
        if self._prefix_bare and not name.startswith(("model.", *HEAD_PREFIXES)):
            name = "model." + name  # a bare OPTModel / LlamaModel / InternLM2Model checkpoint
        self._location[name] = (container, key)

    def keys(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def shape(self, name: str) -> tuple[int, ...]:
        container, key = self._location[name]
        if isinstance(container, Mapping):
            return tuple(container[key].shape)
        return tuple(container.get_slice(key).get_shape())

    def read(
        self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """The tensor, or its ``[start:stop]`` slice along ``dim`` (only that slice is read)."""
        container, key = self._location[name]
        if isinstance(container, Mapping):
            tensor = container[key]
            return tensor if dim is None else tensor.narrow(dim, start, stop - start)
        if dim is None:
            return container.get_tensor(key)
        index = (slice(None),) * dim + (slice(start, stop),)
        return container.get_slice(key)[index]


def _load_bin_mmap(path: Path) -> dict[str, torch.Tensor]:
    """A ``.bin`` state dict, memory-mapped so that slicing does not read the whole file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refused to load {path}: reading it needs arbitrary unpickling, which can run code from the file; "
            f"re-save it as safetensors on a machine where you trust it (torch said: {str(err).splitlines()[0]})"
        ) from err
    except RuntimeError:
        # Files from torch < 1.6 (legacy format) cannot be memory-mapped; read them whole.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


# --------------------------------------------------------------------------- name mapping
def _layer_has(cfg: LLMConfig, ours: str) -> bool:
    """Whether a decoder layer of ``cfg`` has our parameter ``ours`` (relative to the layer)."""
    module, kind = ours.rsplit(".", 1)
    if kind != "bias" or module.endswith("layernorm"):  # weights; OPT's LayerNorm biases
        return True
    if module == "self_attn.o_proj":
        return cfg.has_o_proj_bias
    return cfg.attention_bias  # q/k/v (and OPT's fc1/fc2)


def layer_key_map(cfg: LLMConfig, stack: str = "") -> dict[str, str]:
    """Ours (relative to a layer) -> Hugging Face template, for the tensors a layer of ``cfg`` has.

    ``stack``: ``"encoder"`` or ``"decoder"`` for an encoder-decoder family's layers.
    """
    layer_keys = STACK_LAYER_KEYS[cfg.hf_family][stack] if stack else KEY_MAPS[cfg.hf_family][1]
    return {ours: hf for ours, hf in layer_keys.items() if _layer_has(cfg, ours)}


def _stacks(cfg: LLMConfig) -> dict[str, int]:
    """Layer stacks of ``cfg`` and their depths ("" = a decoder-only model's one stack)."""
    if cfg.hf_family in STACK_LAYER_KEYS:
        return {"encoder": cfg.num_layers, "decoder": cfg.decoder_layers}
    return {"": cfg.num_layers}


def expected_hf_keys(cfg: LLMConfig) -> set[str]:
    """Every tensor name a whole checkpoint of ``cfg`` may hold (a tied head's copy included)."""
    model_keys, _ = KEY_MAPS[cfg.hf_family]
    keys = set(model_keys.values())
    for stack, depth in _stacks(cfg).items():
        for ours, template in layer_key_map(cfg, stack).items():
            indices = range(1) if ours == T5_FIRST_LAYER_ONLY else range(depth)
            keys.update(template.format(index) for index in indices)
    return keys


_LAYER_NAME = re.compile(r"(?:(encoder|decoder)\.)?layers\.(\d+)\.(.+)")


def hf_name_map(model: ParallelCausalLM) -> dict[str, str]:
    """Our parameter names (on this stage) -> Hugging Face names (q/k/v share one in fused layouts)."""
    cfg = model.cfg
    model_keys = KEY_MAPS[cfg.hf_family][0]
    layer_keys = {stack: layer_key_map(cfg, stack) for stack in _stacks(cfg)}
    names: dict[str, str] = {}
    for name, _ in model.named_parameters():
        layer = _LAYER_NAME.fullmatch(name)
        if layer is not None:
            stack, local_index, rest = layer.group(1) or "", int(layer.group(2)), layer.group(3)
            template = layer_keys[stack].get(rest)
            # A decoder-only stage numbers its layers locally; T5's stacks are always whole.
            index = model.layers[local_index].layer_index if not stack else local_index
        else:
            template, rest, index = model_keys.get(name), name, None
        if template is None:
            raise CheckpointMismatchError(
                f"our parameter {name} has no place in a {cfg.hf_family} checkpoint"
            )
        names[name] = template if index is None else template.format(index)
    return names


def _by_hf_name(names: Mapping[str, str]) -> dict[str, list[str]]:
    """Hugging Face name -> our parameters stored in it (one, or q/k/v in FUSED_QKV order)."""
    groups: dict[str, list[str]] = {}
    for ours, hf in names.items():
        groups.setdefault(hf, []).append(ours)
    for ours in groups.values():
        if len(ours) > 1:
            ours.sort(key=_fused_position)
    return groups


def _fused_position(name: str) -> int:
    """Where our ``layers.{i}.self_attn.{q,k,v}_proj.*`` sits in a fused tensor (FUSED_QKV order)."""
    module = name.split(".", 2)[2].rsplit(".", 1)[0]
    return FUSED_QKV.index(module)


def split_fused_qkv(block: torch.Tensor, head_dim: int, queries_per_group: int) -> list[torch.Tensor]:
    """Rows of whole key/value groups of a fused wqkv (weight or bias) -> ``[q, k, v]`` rows.

    Each group is ``queries_per_group`` query heads, one key head, one value head, each
    ``head_dim`` rows; q keeps the heads in order (group by group), as do k and v.
    """
    rest = block.shape[1:]
    groups = block.reshape(-1, queries_per_group + 2, head_dim, *rest)
    return [
        groups[:, :queries_per_group].reshape(-1, *rest),
        groups[:, queries_per_group].reshape(-1, *rest),
        groups[:, queries_per_group + 1].reshape(-1, *rest),
    ]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of :func:`split_fused_qkv`: whole q/k/v (rows of all heads) -> fused rows."""
    rest = q.shape[1:]
    kv_heads = k.shape[0] // head_dim
    parts = [
        q.reshape(kv_heads, -1, head_dim, *rest),
        k.reshape(kv_heads, 1, head_dim, *rest),
        v.reshape(kv_heads, 1, head_dim, *rest),
    ]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def _partition(param: torch.Tensor) -> int | None:
    """The tensor-parallel split dimension of a parameter, or None when it is replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def _expected_hf_shape(model: ParallelCausalLM, name: str, param: torch.Tensor) -> tuple[int, ...]:
    shape = list(param.shape)
    dim = _partition(param)
    if dim is not None:
        shape[dim] *= state.tp_size()
    if name in VOCAB_PARAMS:
        shape[0] = model.vocab_size
    return tuple(shape)


# --------------------------------------------------------------------------- loading
def read_dequantized_dir(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory, bitsandbytes-quantized weights made dense again.

    Read whole (packed 4-bit weights cannot be sliced by rows before dequantizing): an LLM
    directory saved quantized is in memory dense once on each rank while it loads, and the
    model quantizes it again (``models/quantize.py``: int8 gives back the stored rows and
    scales bit for bit).
    """
    tensors: dict[str, torch.Tensor] = {}
    for file in iter_checkpoint_files(model_dir):
        tensors.update(load_state_dict_file(file))
    return dequantize_bnb_tensors(tensors)


@torch.no_grad()
def load_hf_llm_weights(
    model: ParallelCausalLM, source: str | Path | Mapping[str, torch.Tensor] | HFTensors, strict: bool = True
) -> list[str]:
    """Copy this rank's shard of a Hugging Face checkpoint into ``model``; return the HF keys used.

    ``source`` is a model directory, a state dict (HF names) or an :class:`HFTensors`. A
    directory's ``config.json`` must describe ``model.cfg`` (:func:`check_hf_config_matches`).
    Keys of layers on other pipeline stages are skipped silently. ``strict``: unexpected keys
    (names a checkpoint of ``model.cfg`` does not have, such as a bias the config says is
    absent) raise; otherwise they are logged. Missing keys and shape mismatches always raise
    :class:`CheckpointMismatchError` naming the tensors.
    """
    cfg = model.cfg
    if isinstance(source, (str, Path)):
        hf_config = read_hf_config(source)
        check_hf_config_matches(cfg, hf_config, source)
        if hf_config.get("quantization_config"):
            source = HFTensors.from_state_dict(read_dequantized_dir(source), cfg.hf_family)
        else:
            source = HFTensors.from_directory(source, cfg.hf_family)
    elif not isinstance(source, HFTensors):
        source = HFTensors.from_state_dict(source, cfg.hf_family)
    expected = expected_hf_keys(cfg)
    unexpected = sorted(
        k for k in source.keys() if k not in expected and not any(p.fullmatch(k) for p in IGNORED_HF_KEYS)
    )
    if unexpected:
        message = (
            f"{len(unexpected)} unexpected keys in the checkpoint for a {cfg.hf_family} model with "
            f"attention_bias={cfg.attention_bias}, o_proj bias={cfg.has_o_proj_bias}: {unexpected}"
        )
        if strict:
            raise CheckpointMismatchError(message)
        logger.warning(message)

    groups = _by_hf_name(hf_name_map(model))
    tied_source = KEY_MAPS[cfg.hf_family][0]["embed_tokens.weight"]
    params = dict(model.named_parameters())
    missing: list[str] = []
    plan: list[tuple[str, list[str]]] = []
    for hf_name, ours in groups.items():
        if ours == ["lm_head.weight"] and cfg.tie_word_embeddings and hf_name not in source:
            # A tied head on a stage without the embedding keeps a copy of the embedding;
            # checkpoints saved with tying usually drop the head.
            hf_name = tied_source
        if hf_name not in source:
            missing.append(hf_name)
        else:
            plan.append((hf_name, ours))
    if missing:
        raise CheckpointMismatchError(f"{len(missing)} tensors missing from the checkpoint: {missing}")

    rank = state.tp_rank()
    for hf_name, ours in plan:
        if len(ours) > 1:
            _load_fused_qkv(model, source, hf_name, [params[name] for name in ours])
            continue
        our_name, param = ours[0], params[ours[0]]
        expected_shape = _expected_hf_shape(model, our_name, param)
        found = source.shape(hf_name)
        if found != expected_shape:
            raise CheckpointMismatchError(
                f"{hf_name}: checkpoint shape {found} does not match the model's {expected_shape} (our {our_name})"
            )
        dim = _partition(param)
        if dim is None:
            param.copy_(source.read(hf_name))
            continue
        local = param.shape[dim]
        start, stop = rank * local, min((rank + 1) * local, expected_shape[dim])
        if stop > start:
            shard = source.read(hf_name, dim, start, stop)
            param.narrow(dim, 0, stop - start).copy_(shard)
        if stop - start < local:  # vocabulary padding rows of the last rank(s)
            param.narrow(dim, max(stop - start, 0), local - max(stop - start, 0)).zero_()
    logger.info("loaded %d tensors into LLM layers %s (tp rank %d)", len(plan), model.layer_range, rank)
    return [hf_name for hf_name, _ in plan]


def _load_fused_qkv(
    model: ParallelCausalLM, source: HFTensors, hf_name: str, qkv: list[torch.Tensor]
) -> None:
    """This rank's q/k/v rows from a fused wqkv: the contiguous blocks of its key/value groups."""
    cfg = model.cfg
    head_dim, per_group = cfg.head_dim, cfg.num_heads // cfg.kv_heads
    rest = tuple(qkv[0].shape[1:])
    expected = ((cfg.num_heads + 2 * cfg.kv_heads) * head_dim, *rest)
    found = source.shape(hf_name)
    if found != expected:
        raise CheckpointMismatchError(
            f"{hf_name}: checkpoint shape {found} does not match the model's {expected} "
            f"({cfg.kv_heads} groups of {per_group} query heads + key + value, head_dim {head_dim})"
        )
    rows = cfg.kv_heads // state.tp_size() * (per_group + 2) * head_dim  # this rank's whole groups
    start = state.tp_rank() * rows
    parts = split_fused_qkv(source.read(hf_name, 0, start, start + rows), head_dim, per_group)
    for param, part in zip(qkv, parts, strict=True):
        param.copy_(part)


# --------------------------------------------------------------------------- export
@torch.no_grad()
def export_hf_state_dict(model: ParallelCausalLM) -> dict[str, torch.Tensor]:
    """This stage's weights as full (TP-gathered) CPU tensors under Hugging Face names.

    Collective over the TP group: every TP rank must call it. The vocabulary padding is
    dropped; InternLM2's q/k/v are fused into its wqkv again. A tied head is exported as the
    head's name too (the same tensor as the embedding), as ``*ForCausalLM.state_dict()``
    does. With pipeline stages each stage exports its own part; merging the dicts gives the
    whole model. A quantized LLM (``llm.quantize``) is refused: export the dense weights and
    let the reader quantize them (transformers' ``BitsAndBytesConfig``), as we do on loading.
    """
    mode = getattr(model, "quantization", "none")
    if mode != "none":
        raise ValueError(
            f"cannot export an LLM quantized to {mode} (llm.quantize={mode}): its weights are bitsandbytes' "
            "packed form, not Hugging Face's dense tensors; export the model loaded without quantization "
            "(llm.quantize=none, no --quantize) and quantize it where it is loaded "
            "(transformers: quantization_config=BitsAndBytesConfig(...))"
        )
    full: dict[str, torch.Tensor] = {}
    for our_name, param in model.named_parameters():
        dim = _partition(param)
        tensor = param.detach() if dim is None else gather_from_tp_ranks(param.detach(), dim)
        if our_name in VOCAB_PARAMS:
            tensor = tensor[: model.vocab_size]
        full[our_name] = tensor.cpu()
    names = hf_name_map(model)
    exported: dict[str, torch.Tensor] = {}
    for hf_name, ours in _by_hf_name(names).items():
        parts = [full[name] for name in ours]
        exported[hf_name] = parts[0] if len(parts) == 1 else fuse_qkv(*parts, head_dim=model.cfg.head_dim)
    if model.post_process and model.pre_process and model.tie_word_embeddings:
        exported[KEY_MAPS[model.cfg.hf_family][0]["lm_head.weight"]] = exported[names["embed_tokens.weight"]]
    return exported


def save_hf_llm(model: ParallelCausalLM, out_dir: str | Path) -> Path | None:
    """Write a Hugging Face directory (config.json + model.safetensors) for a whole-model LLM.

    Collective over the TP group; TP rank 0 writes (returns the directory, others None).
    Pipeline stages are not merged here: export each stage and merge the dicts. An InternLM2
    model is written in InternLM2's own layout; loading it in transformers needs InternLM2's
    remote code files beside it (its config names them in ``auto_map``).
    """
    if not (model.pre_process and model.post_process and model.layer_range == (0, model.cfg.num_layers)):
        raise ValueError(
            "save_hf_llm needs the whole model on one stage; merge export_hf_state_dict() of the stages"
        )
    config = hf_config_dict(model.cfg)  # refuses what the family's config cannot express, before any work
    tensors = export_hf_state_dict(model)
    if state.tp_rank() != 0:
        return None
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.tie_word_embeddings:
        # safetensors refuses shared storage
        tensors.pop(KEY_MAPS[model.cfg.hf_family][0]["lm_head.weight"], None)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"}
    )
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    logger.info("wrote a Hugging Face %s model to %s", model.cfg.hf_family, out_dir)
    return out_dir
