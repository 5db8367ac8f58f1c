"""Hugging Face ``Blip2ForConditionalGeneration`` <-> ours: configs, weights, inputs.

Our module names follow transformers' (``vision_model``, ``qformer``, ``query_tokens``,
``language_projection``, ``language_model``) one level down (``query_encoder.`` holds the
first three), so the conversion is prefix renames plus the LLM's own key map and TP
slicing (``convert/hf_llm.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import transformers

from blip2_megatron.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2_megatron.config_utils import ConfigError

logger = logging.getLogger(__name__)

# transformers key prefix -> ours, for everything outside the language model.
PREFIX_MAP = {
    "vision_model.": "query_encoder.visual_encoder.",
    "qformer.": "query_encoder.qformer.",
    "query_tokens": "query_encoder.query_tokens",
    "language_projection.": "language_projection.",
}
HF_LLM_PREFIX = "language_model."
OPT_IMAGE_TOKEN = 50265  # the "<image>" id Salesforce's blip2-opt checkpoints use (vocab padded to 50272)


def image_token_id(llm: LLMConfig) -> int:
    """The placeholder id transformers uses to mark query slots in ``input_ids``."""
    if llm.arch == "opt" and llm.vocab_size == 50272:
        return OPT_IMAGE_TOKEN
    return llm.vocab_size - 1


def hf_text_config(llm: LLMConfig) -> transformers.PretrainedConfig:
    if llm.arch == "opt":
        return transformers.OPTConfig(
            vocab_size=llm.vocab_size,
            hidden_size=llm.hidden_size,
            num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads,
            ffn_dim=llm.intermediate_size,
            max_position_embeddings=llm.max_position_embeddings,
            word_embed_proj_dim=llm.hidden_size,
            do_layer_norm_before=True,
            enable_bias=llm.attention_bias,
            activation_function="relu",
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            bos_token_id=llm.bos_token_id,
            eos_token_id=llm.eos_token_id,
            pad_token_id=llm.pad_token_id,
            tie_word_embeddings=llm.tie_word_embeddings,
        )
    return transformers.LlamaConfig(
        vocab_size=llm.vocab_size,
        hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.kv_heads,
        intermediate_size=llm.intermediate_size,
        max_position_embeddings=llm.max_position_embeddings,
        rms_norm_eps=llm.norm_eps,
        rope_theta=llm.rope_theta,
        attention_bias=llm.attention_bias,
        tie_word_embeddings=llm.tie_word_embeddings,
        bos_token_id=llm.bos_token_id,
        eos_token_id=llm.eos_token_id,
        pad_token_id=llm.pad_token_id,
    )


def hf_config_from_ours(cfg: Blip2Config) -> transformers.Blip2Config:
    """A transformers Blip2Config with our sizes (dropout off, as our parity tests compare)."""
    if cfg.llm is None:
        raise ConfigError("only models with an LLM (model.kind 'llm' / 'minigpt4') map to Blip2ForConditionalGeneration")
    vision, qformer = cfg.vision, cfg.qformer
    hf = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=vision.hidden_size,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.num_layers,
            num_attention_heads=vision.num_heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act=vision.hidden_act,
            layer_norm_eps=vision.layer_norm_eps,
            qkv_bias=vision.qkv_bias,
        ),
        qformer_config=dict(
            vocab_size=qformer.vocab_size,
            hidden_size=qformer.hidden_size,
            num_hidden_layers=qformer.num_layers,
            num_attention_heads=qformer.num_heads,
            intermediate_size=qformer.intermediate_size,
            hidden_dropout_prob=qformer.hidden_dropout_prob,
            attention_probs_dropout_prob=qformer.attention_dropout_prob,
            max_position_embeddings=qformer.max_position_embeddings,
            layer_norm_eps=qformer.layer_norm_eps,
            pad_token_id=qformer.pad_token_id,
            cross_attention_frequency=qformer.cross_attention_frequency,
            encoder_hidden_size=vision.hidden_size,
        ),
        text_config=hf_text_config(cfg.llm).to_dict(),
        num_query_tokens=qformer.num_query_tokens,
        image_text_hidden_size=qformer.embed_dim,
        image_token_index=image_token_id(cfg.llm),
    )
    return hf


def llm_config_from_hf_text(text: dict[str, Any]) -> dict[str, Any]:
    """LLMConfig fields from a transformers OPT / LLaMA-family config dict."""
    model_type = text.get("model_type")
    if model_type == "opt":
        if not text.get("do_layer_norm_before", True) or text.get("word_embed_proj_dim", text["hidden_size"]) != text[
            "hidden_size"
        ]:
            raise ConfigError("OPT variants with post-LN or project_in/out (OPT-350M) are not supported")
        return dict(
            arch="opt",
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            intermediate_size=text["ffn_dim"],
            max_position_embeddings=text["max_position_embeddings"],
            tie_word_embeddings=text.get("tie_word_embeddings", True),
            attention_bias=text.get("enable_bias", True),
            bos_token_id=text.get("bos_token_id", 2),
            pad_token_id=text.get("pad_token_id", 1),
            norm_eps=1e-5,
        )
    if model_type in ("llama", "internlm2", "mistral", "qwen2"):
        return dict(
            arch="llama",
            vocab_size=text["vocab_size"],
            hidden_size=text["hidden_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=text["num_attention_heads"],
            num_kv_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            intermediate_size=text["intermediate_size"],
            max_position_embeddings=text.get("max_position_embeddings", 2048),
            norm_eps=text.get("rms_norm_eps", 1e-6),
            rope_theta=text.get("rope_theta", 10000.0),
            tie_word_embeddings=text.get("tie_word_embeddings", False),
            attention_bias=text.get("attention_bias", False),
            bos_token_id=text.get("bos_token_id", 1),
            eos_token_id=text.get("eos_token_id", 2),
            pad_token_id=text.get("pad_token_id") if text.get("pad_token_id") is not None else 0,
        )
    raise ConfigError(f"language model type {model_type!r} is not supported (opt and llama-family are)")


def ours_config_from_hf(hf: dict[str, Any], prompt: str = "a photo of") -> Blip2Config:
    """Our Blip2Config from a transformers Blip2 ``config.json`` dict."""
    v, q = hf["vision_config"], hf["qformer_config"]
    vision = VisionConfig(
        image_size=v.get("image_size", 224),
        patch_size=v.get("patch_size", 14),
        hidden_size=v.get("hidden_size", 1408),
        num_layers=v.get("num_hidden_layers", 39),
        num_heads=v.get("num_attention_heads", 16),
        intermediate_size=v.get("intermediate_size", 6144),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        ln_vision_eps=v.get("layer_norm_eps", 1e-6),  # transformers uses one epsilon for both
        qkv_bias=v.get("qkv_bias", True),
        hidden_act=v.get("hidden_act", "gelu"),
    )
    qformer = QFormerConfig(
        hidden_size=q.get("hidden_size", 768),
        num_layers=q.get("num_hidden_layers", 12),
        num_heads=q.get("num_attention_heads", 12),
        intermediate_size=q.get("intermediate_size", 3072),
        vocab_size=q.get("vocab_size", 30522) + 1,
        bos_token_id=q.get("vocab_size", 30522),
        max_position_embeddings=q.get("max_position_embeddings", 512),
        cross_attention_frequency=q.get("cross_attention_frequency", 2),
        num_query_tokens=hf.get("num_query_tokens", 32),
        embed_dim=hf.get("image_text_hidden_size", 256),
        hidden_dropout_prob=q.get("hidden_dropout_prob", 0.1),
        attention_dropout_prob=q.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=q.get("layer_norm_eps", 1e-12),
    )
    llm = LLMConfig(**llm_config_from_hf_text(hf["text_config"]))
    return Blip2Config(kind="llm", vision=vision, qformer=qformer, llm=llm, prompt=prompt)


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    return json.loads(path.read_text())


def hf_inputs_from_batch(cfg: Blip2Config, tokenizer: Any, samples: dict[str, Any], hf_cfg: Any) -> dict[str, torch.Tensor]:
    """transformers Blip2 inputs equal to ours: image-token placeholders in the query slots."""
    from blip2_megatron.models.blip2 import build_llm_inputs

    prompts = samples.get("prompt") or [cfg.prompt] * len(samples["text_input"])
    inputs = build_llm_inputs(tokenizer, cfg, list(prompts), list(samples["text_input"]))
    input_ids = inputs.input_ids.masked_fill(inputs.image_slots, hf_cfg.image_token_index)
    return {
        "pixel_values": samples["image"],
        "input_ids": input_ids,
        "attention_mask": inputs.attention_mask,
        "labels": inputs.labels,
    }
