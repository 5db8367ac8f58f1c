"""Hugging Face ``Blip2ForConditionalGeneration`` / ``InstructBlipForConditionalGeneration`` <-> ours.

Our module names follow transformers' (``vision_model``, ``qformer``, ``query_tokens``,
``language_projection``, ``language_model``) one level down (``query_encoder.`` holds the
first three), so the conversion is the prefix renames of ``convert/vision_qformer.py``
plus the LLM's own key map and TP slicing (``convert/hf_llm.py``). transformers 5.23
saves the LLM under ``language_model.model.decoder.*`` (OPT) / ``language_model.model.*``
(LLaMA) and ``language_model.lm_head.weight`` (absent when tied to the embedding).

FlanT5 (T5 v1.1) is the encoder-decoder case: ``language_model.*`` holds a
``T5ForConditionalGeneration`` (``shared``, ``encoder.block.*``, ``decoder.block.*``,
``lm_head``), the query outputs fill the ``<image>`` slots of the encoder's ``input_ids``
and the labels are the decoder's targets. Checkpoints saved from ``.bin`` files repeat
``shared`` as ``encoder.embed_tokens`` / ``decoder.embed_tokens`` (not read). transformers
5 builds every T5 with its head tied to ``shared`` and unties it on loading only a file
whose ``lm_head`` differs, so the export always writes ``lm_head``.

* :func:`hf_blip2_model_config` gives our config for a local Blip2 directory (the
  assembly layer, ``blip2_megatron.build``, builds the model with ``init_checkpoint=<dir>``
  after :func:`check_hf_blip2_checkpoint` has named any tensor the directory lacks).
* :func:`export_hf_blip2` writes a directory that
  ``transformers.Blip2ForConditionalGeneration.from_pretrained`` loads.

The end of a caption: BLIP-2's OPT models end captions with "\\n" (50118 with OPT's
tokenizer; Salesforce's checkpoints store it as ``text_config.eos_token_id``, which is
where transformers' ``generate`` stops); LLaMA-family models end with the tokenizer's eos.

InstructBLIP (``model_type`` "instructblip", ours ``model.instruction_aware``): the same
layout plus the Q-Former's text embeddings (``qformer.embeddings.word_embeddings`` /
``position_embeddings``; BERT's embedding LayerNorm is ``qformer.embeddings.layernorm``
there, ``qformer.layernorm`` in ours and Blip2's) and text FFNs. Its directory keeps the
Q-Former's BERT tokenizer in a ``qformer_tokenizer`` sub-folder (as
``InstructBlipProcessor.save_pretrained`` writes it), and its ``qformer_config.vocab_size``
counts the embedding's rows ([DEC] included), where Blip2's leaves [DEC] out.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from blip2_megatron.config import Blip2Config, ConfigError, LLMConfig, QFormerConfig, from_dict, merge_dicts
from blip2_megatron.convert.hf_llm import (
    IGNORED_HF_KEYS,
    export_hf_state_dict,
    hf_config_dict,
    hf_name_map,
    llm_config_from_hf,
    read_hf_config,
)
from blip2_megatron.convert.vision_qformer import ours_to_hf_vision_qformer, summarize_keys
from blip2_megatron.data.batch import LLMBatchBuilder
from blip2_megatron.data.processors import CLIP_MEAN, CLIP_STD
from blip2_megatron.data.tokenizers import TOKENIZER_FILES, build_tokenizer, holds_tokenizer
from blip2_megatron.io import (
    CheckpointMismatchError,
    atomic_directory,
    iter_checkpoint_files,
    load_state_dict_file,
)
from blip2_megatron.models.blip2 import Blip2ForLLM
from blip2_megatron.models.quantize import is_bnb_extra_key, mode_from_quantization_config
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)

HF_LLM_PREFIX = "language_model."  # the same in transformers and in Blip2ForLLM
PROJECTION_PREFIX = "language_projection."  # the same in transformers and in Blip2ForLLM
HF_LM_HEAD = HF_LLM_PREFIX + "lm_head.weight"
OPT_IMAGE_TOKEN = 50265  # the "<image>" id Salesforce's blip2-opt checkpoints use (vocab padded to 50272)
# The first id past FlanT5's 32100 tokenizer entries (its embedding has 32128 rows, the rest
# unused): the id a token added to its tokenizer gets, and no text's.
T5_IMAGE_TOKEN = 32100
OPT_CAPTION_END = "\n"  # BLIP-2 OPT captions end here (LAVIS: the first id of tokenizer("\n"))
BICUBIC = 3  # PIL.Image.BICUBIC, the resampling of our eval transform
# LLM families whose model transformers ships, so that its Blip2 can hold them (not InternLM2).
TRANSFORMERS_LLM_FAMILIES = ("opt", "llama", "qwen2", "mistral", "t5")
BLIP2_MODEL_TYPE, INSTRUCTBLIP_MODEL_TYPE = "blip-2", "instructblip"
#: Sub-folder of an InstructBlip directory with the Q-Former's BERT tokenizer (InstructBlipProcessor's).
QFORMER_TOKENIZER_DIR = "qformer_tokenizer"
#: Q-Former tokens an instruction is cut to (LAVIS's max_txt_len of the instruct models).
INSTRUCTION_MAX_TOKENS = 128


def image_token_id(llm: LLMConfig) -> int:
    """The placeholder id transformers uses to mark query slots in ``input_ids``."""
    if llm.arch == "opt" and llm.vocab_size == 50272:
        return OPT_IMAGE_TOKEN
    if llm.arch == "t5" and llm.vocab_size == 32128:
        return T5_IMAGE_TOKEN
    return llm.vocab_size - 1


# ------------------------------------------------------------------------------ configs
def hf_text_config(llm: LLMConfig) -> transformers.PretrainedConfig:
    """The transformers OPT / LLaMA / Qwen2 / Mistral / T5 config of ``llm`` as a Blip2 ``text_config``.

    As :func:`~blip2_megatron.convert.hf_llm.hf_config_dict`, except that the eos is the
    caption end (so transformers' generate stops where ours does) and OPT's dropout is off
    (our decoder has none; the benchmark's transformers baseline must not have it either).
    """
    if llm.hf_family not in TRANSFORMERS_LLM_FAMILIES:
        raise ConfigError(
            f"transformers' Blip2 cannot hold a {llm.hf_family} LLM (transformers ships no such model): "
            "export the run's LLM with convert.hf_llm.save_hf_llm and keep the run for the rest"
        )
    fields = hf_config_dict(llm)
    fields["eos_token_id"] = llm.eos_token_id
    if llm.arch == "opt":
        fields.update(dropout=0.0, attention_dropout=0.0, layerdrop=0.0)
    return transformers.AutoConfig.for_model(**fields)


def hf_config_from_ours(cfg: Blip2Config) -> transformers.Blip2Config | transformers.InstructBlipConfig:
    """A transformers Blip2Config with our sizes (dropout as ours; inverse of :func:`ours_config_from_hf`).

    An instruction-aware model gives an InstructBlipConfig (its Q-Former's vocabulary
    counts [DEC]: it holds the word embeddings).

    transformers' ViT applies ``vision.layer_norm_eps`` to ``post_layernorm`` too: a model
    whose ``ln_vision_eps`` differs (LAVIS uses 1e-5 there) is exported with a small
    numerical difference there.
    """
    if cfg.llm is None:
        raise ConfigError(
            "only models with an LLM (model.kind 'llm' / 'minigpt4') map to Blip2ForConditionalGeneration"
        )
    if cfg.image_encoder != "qformer":
        raise ConfigError(
            f"model.image_encoder={cfg.image_encoder!r} (MiniGPT-4's LLaMA-2 variant: ViT patch tokens "
            "projected straight into the LLM) has no Q-Former: transformers' Blip2ForConditionalGeneration "
            "cannot hold it; keep it in our checkpoint format"
        )
    vision, qformer = cfg.vision, cfg.qformer
    if vision.pre_layernorm:
        raise ConfigError(
            "transformers' Blip2 vision model has no pre_layernorm (CLIP ViT-L): cannot export it"
        )
    vision_config = dict(
        hidden_size=vision.hidden_size,
        intermediate_size=vision.intermediate_size,
        num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        hidden_act=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps,
        qkv_bias=vision.qkv_bias,
    )
    qformer_config = dict(
        # Blip2 has no Q-Former word embeddings and leaves [DEC] out; InstructBlip's has its rows.
        vocab_size=qformer.vocab_size if cfg.instruction_aware else qformer.vocab_size - 1,
        hidden_size=qformer.hidden_size,
        num_hidden_layers=qformer.num_layers,
        num_attention_heads=qformer.num_heads,
        intermediate_size=qformer.intermediate_size,
        hidden_dropout_prob=qformer.hidden_dropout_prob,
        attention_probs_dropout_prob=qformer.attention_dropout_prob,
        max_position_embeddings=qformer.max_position_embeddings,
        layer_norm_eps=qformer.layer_norm_eps,
        initializer_range=qformer.initializer_range,
        pad_token_id=qformer.pad_token_id,
        cross_attention_frequency=qformer.cross_attention_frequency,
        encoder_hidden_size=vision.hidden_size,
    )
    common = dict(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=hf_text_config(cfg.llm).to_dict(),
        num_query_tokens=qformer.num_query_tokens,
        image_token_index=image_token_id(cfg.llm),
    )
    if cfg.instruction_aware:
        hf = transformers.InstructBlipConfig(**common)
        hf.architectures = ["InstructBlipForConditionalGeneration"]
    else:
        hf = transformers.Blip2Config(**common, image_text_hidden_size=qformer.embed_dim)
        hf.architectures = ["Blip2ForConditionalGeneration"]
    return hf


def full_hf_config(
    hf: Mapping[str, Any] | transformers.Blip2Config | transformers.InstructBlipConfig,
) -> dict[str, Any]:
    """A Blip2 / InstructBlip config dict with transformers' defaults filled in (checkpoints store only changes)."""
    if not isinstance(hf, (transformers.Blip2Config, transformers.InstructBlipConfig)):
        model_type = hf.get("model_type")
        if model_type not in (None, BLIP2_MODEL_TYPE, INSTRUCTBLIP_MODEL_TYPE):
            raise ConfigError(
                f"model_type {model_type!r} is not a Blip2 model ('{BLIP2_MODEL_TYPE}') nor an InstructBlip "
                f"model ('{INSTRUCTBLIP_MODEL_TYPE}')"
            )
        config_class = (
            transformers.InstructBlipConfig
            if model_type == INSTRUCTBLIP_MODEL_TYPE
            else transformers.Blip2Config
        )
        hf = config_class.from_dict(dict(hf))
    return hf.to_dict()


def caption_eos_token_id(arch: str, tokenizer: Any) -> int:
    """The id that ends a caption: "\\n" for OPT when the tokenizer has it as one token, else its eos."""
    if arch == "opt":
        ids = tokenizer(OPT_CAPTION_END, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return ids[0]
    if tokenizer.eos_token_id is None:
        raise ConfigError("the LLM tokenizer has no eos token; set model.llm.eos_token_id")
    return tokenizer.eos_token_id


def ours_config_from_hf(
    hf: Mapping[str, Any] | transformers.Blip2Config,
    tokenizer: Any = None,
    overrides: Mapping[str, Any] | None = None,
) -> Blip2Config:
    """Our Blip2Config from a transformers Blip2 config (``config.json`` dict or object).

    With ``tokenizer`` the caption end follows it (see :func:`caption_eos_token_id`);
    without, ``text_config.eos_token_id``. ``overrides`` is a nested dict of Blip2Config
    fields (``{"llm": {"tp": 2}, "prompt": ""}``), validated with errors naming the key.
    An InstructBlip config gives an instruction-aware model (no default prompt: the
    instruction is the prompt; instructions cut to :data:`INSTRUCTION_MAX_TOKENS` Q-Former
    tokens, or fewer where its positions end).
    """
    hf = full_hf_config(hf)
    v, q, text = hf["vision_config"], hf["qformer_config"], hf["text_config"]
    instruction_aware = hf.get("model_type") == INSTRUCTBLIP_MODEL_TYPE
    # Blip2's Q-Former vocabulary leaves [DEC] out (it holds no word embeddings); InstructBlip's counts it.
    qformer_vocab = q["vocab_size"] if instruction_aware else q["vocab_size"] + 1
    llm = dataclasses.asdict(llm_config_from_hf(text))
    if tokenizer is not None:
        llm["eos_token_id"] = caption_eos_token_id(llm["arch"], tokenizer)
    else:
        eos = text.get("eos_token_id")
        llm["eos_token_id"] = (
            eos[0] if isinstance(eos, list) else eos if eos is not None else llm["eos_token_id"]
        )
    if llm["arch"] == "opt":
        end_sym, prompt = OPT_CAPTION_END, "a photo of"
    elif llm["arch"] == "t5":
        end_sym, prompt = "", ""  # T5's tokenizer ends every text with its eos itself
    else:
        end_sym, prompt = (tokenizer.eos_token if tokenizer is not None else "</s>"), ""
    instruction = {}
    if instruction_aware:
        prompt = ""
        instruction = dict(max_txt_len=min(INSTRUCTION_MAX_TOKENS, q["max_position_embeddings"]))
    data = dict(
        kind="llm",
        vision=dict(
            image_size=v["image_size"],
            patch_size=v["patch_size"],
            hidden_size=v["hidden_size"],
            num_layers=v["num_hidden_layers"],
            num_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"],
            layer_norm_eps=v["layer_norm_eps"],
            ln_vision_eps=v["layer_norm_eps"],  # transformers uses one epsilon for both
            qkv_bias=v["qkv_bias"],
            hidden_act=v["hidden_act"],
        ),
        qformer=dict(
            hidden_size=q["hidden_size"],
            num_layers=q["num_hidden_layers"],
            num_heads=q["num_attention_heads"],
            intermediate_size=q["intermediate_size"],
            vocab_size=qformer_vocab,
            bos_token_id=qformer_vocab - 1,  # [DEC], the last id
            max_position_embeddings=q["max_position_embeddings"],
            cross_attention_frequency=q["cross_attention_frequency"],
            num_query_tokens=hf["num_query_tokens"],
            embed_dim=hf.get(
                "image_text_hidden_size", QFormerConfig.embed_dim
            ),  # no ITC head in InstructBlip
            hidden_dropout_prob=q["hidden_dropout_prob"],
            attention_dropout_prob=q["attention_probs_dropout_prob"],
            layer_norm_eps=q["layer_norm_eps"],
            initializer_range=q.get("initializer_range", 0.02),
            pad_token_id=q["pad_token_id"] if q.get("pad_token_id") is not None else 0,
            **instruction,
        ),
        llm=llm,
        prompt=prompt,
        end_sym=end_sym,
        instruction_aware=instruction_aware,
    )
    return from_dict(Blip2Config, merge_dicts(data, dict(overrides or {})), prefix="model")


def _nested_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``{"llm.tp": 2, "model.prompt": ""}`` -> ``{"llm": {"tp": 2}, "prompt": ""}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.removeprefix("model.").split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = merge_dicts(node.get(parts[-1], {}), value) if isinstance(value, dict) else value
    return nested


# ------------------------------------------------------------------------------ names
def hf_names(model: nn.Module) -> dict[str, str]:
    """Our parameter names -> transformers ``Blip2ForConditionalGeneration`` names (the parts present).

    An instruction-aware model's: ``InstructBlipForConditionalGeneration`` names.
    """
    ours = [name for name, _ in model.named_parameters() if not name.startswith(HF_LLM_PREFIX)]
    instructblip = model.cfg.instruction_aware
    # values carry our names
    renamed, rest = ours_to_hf_vision_qformer({name: name for name in ours}, instructblip=instructblip)
    names = {our: hf for hf, our in renamed.items()}
    for name in rest:
        if not name.startswith(PROJECTION_PREFIX):
            raise ValueError(f"{name} has no place in a transformers Blip2ForConditionalGeneration")
        names[name] = name
    language_model = getattr(model, "language_model", None)
    if language_model is not None:
        for our, hf in hf_name_map(language_model).items():
            names[HF_LLM_PREFIX + our] = HF_LLM_PREFIX + hf
    return names


def checkpoint_keys(model_dir: str | Path) -> list[str]:
    """Tensor names in a Hugging Face directory (safetensors headers only; ``.bin`` files are read)."""
    from safetensors import safe_open

    keys: list[str] = []
    for path in iter_checkpoint_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                keys.extend(handle.keys())
        else:
            keys.extend(load_state_dict_file(path))
    return keys


def check_hf_blip2_checkpoint(model_dir: str | Path, cfg: Blip2Config) -> None:
    """Raise :class:`CheckpointMismatchError` naming every tensor the model needs that ``model_dir`` lacks.

    Checked on a meta-device model before anything is read; shapes are checked (naming the
    tensor) while the factory copies the weights.
    """
    from blip2_megatron.models.param_count import build_meta_model

    expected = set(hf_names(build_meta_model(cfg)).values())
    present = set(checkpoint_keys(model_dir))
    missing = sorted(expected - present)
    if missing:
        raise CheckpointMismatchError(
            f"{model_dir}: {len(missing)} tensors the model needs are missing: {_list_keys(missing)}"
        )
    unexpected = sorted(
        k for k in present - expected - {HF_LM_HEAD} if not (_ignored_llm_key(k) or is_bnb_extra_key(k))
    )
    if unexpected:
        logger.warning("%s: %d tensors are not used: %s", model_dir, len(unexpected), _list_keys(unexpected))


def _ignored_llm_key(key: str) -> bool:
    """A ``language_model.*`` entry the LLM loader skips (T5's embedding copies, stored RoPE frequencies)."""
    name = key.removeprefix(HF_LLM_PREFIX)
    return name != key and any(pattern.fullmatch(name) for pattern in IGNORED_HF_KEYS)


def _list_keys(keys: list[str], exact_up_to: int = 10) -> str:
    """A few names in full; many collapsed per layer (``layers.{0-31}.fc1.weight``)."""
    return ", ".join(keys) if len(keys) <= exact_up_to else summarize_keys(keys)


# ------------------------------------------------------------------------------ loading
def _tokenizer_spec(model_dir: Path, llm_overrides: Mapping[str, Any]) -> str:
    spec = llm_overrides.get("tokenizer") or str(model_dir)
    if spec == str(model_dir) and not holds_tokenizer(model_dir):
        raise ConfigError(
            f"{model_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "pass llm.tokenizer=<local tokenizer directory>"
        )
    return spec


def hf_model_type(path: str | Path) -> str | None:
    """The ``model_type`` of a directory's config.json (None without one)."""
    config = Path(path) / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def is_hf_blip2_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers Blip2 or InstructBlip directory (model_type blip-2 / instructblip)."""
    return hf_model_type(path) in (BLIP2_MODEL_TYPE, INSTRUCTBLIP_MODEL_TYPE)


def is_instructblip_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers InstructBlip directory (model_type instructblip)."""
    return hf_model_type(path) == INSTRUCTBLIP_MODEL_TYPE


def _qformer_tokenizer_spec(model_dir: Path, qformer_overrides: Mapping[str, Any]) -> str:
    """InstructBlip: the Q-Former tokenizer, ``qformer.tokenizer`` or the directory's ``qformer_tokenizer``."""
    spec = qformer_overrides.get("tokenizer")
    if spec:
        return spec
    folder = model_dir / QFORMER_TOKENIZER_DIR
    if not holds_tokenizer(folder):
        raise ConfigError(
            f"{model_dir} is an InstructBlip directory without a {QFORMER_TOKENIZER_DIR}/ folder holding the "
            "Q-Former's BERT tokenizer; pass qformer.tokenizer=<local tokenizer directory>"
        )
    return str(folder)


def _warn_on_token_mismatch(cfg: Blip2Config, tokenizer: Any, text: Mapping[str, Any]) -> None:
    """Say where transformers' generate on the same directory would behave differently."""
    eos = text.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is not None and eos != cfg.llm.eos_token_id:
        logger.warning(
            "captions end at token %d (from the tokenizer) but text_config.eos_token_id is %s: "
            "transformers' generate on this directory stops at the latter",
            cfg.llm.eos_token_id,
            eos,
        )
    bos = text.get("bos_token_id")
    if bos is not None and tokenizer.bos_token_id is not None and bos != tokenizer.bos_token_id:
        logger.warning(
            "the tokenizer's bos id %d differs from text_config.bos_token_id %d: prompts start with the "
            "tokenizer's, transformers' prompt-less generate with the config's",
            tokenizer.bos_token_id,
            bos,
        )


def _stored_dtype_name(raw: Mapping[str, Any]) -> str | None:
    """The dtype a Blip2 ``config.json`` says its weights are stored in ("fp32" / "bf16"), if it says.

    fp16 reads as bf16: a T5 stored in fp16 was cut down from bf16 and overflows when computed in fp16.
    """
    name = raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("torch_dtype")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "bf16"}.get(str(name))


def hf_blip2_model_config(
    model_dir: str | Path, overrides: Mapping[str, Any] | None = None, tp: int | None = None
) -> Blip2Config:
    """Our Blip2Config for a local transformers Blip2 / InstructBlip directory (``init_checkpoint`` = the directory).

    The caption end follows the directory's tokenizer (or ``llm.tokenizer``); ``overrides``
    are Blip2Config fields, dotted or nested (``{"llm.tp": 2}``, ``{"prompt": ""}``); ``tp``
    is the running tensor-parallel size, used when the overrides do not set one.

    A T5 LLM keeps the dtype the directory stores (as transformers' ``from_pretrained``
    does) unless ``llm.dtype`` is given: "auto" would make it bf16 even on the CPU (T5 has
    no fp16, so there is no fallback to fp32 there as for the others), and its tokens would
    then differ from transformers' generate on the same directory.

    A directory transformers saved quantized (``quantization_config``, bitsandbytes 8-bit
    or NF4) is loaded dense and quantized again in the same mode (``llm.quantize``, which
    the overrides may change; ``models/quantize.py``).

    An InstructBlip directory gives an instruction-aware model whose Q-Former tokenizer is
    the directory's ``qformer_tokenizer`` folder (or ``qformer.tokenizer``).
    """
    model_dir = Path(model_dir)
    raw = read_hf_config(model_dir)
    nested = _nested_overrides(overrides or {})
    llm_overrides = nested.setdefault("llm", {})
    if raw.get("quantization_config"):
        llm_overrides.setdefault("quantize", mode_from_quantization_config(raw["quantization_config"]))
    if tp is not None:
        llm_overrides.setdefault("tp", tp)
    if raw.get("model_type") == INSTRUCTBLIP_MODEL_TYPE:
        qformer_overrides = nested.setdefault("qformer", {})
        qformer_overrides["tokenizer"] = _qformer_tokenizer_spec(model_dir, qformer_overrides)
    spec = _tokenizer_spec(model_dir, llm_overrides)
    text = full_hf_config(raw)["text_config"]
    arch = llm_config_from_hf(text).arch
    stored = _stored_dtype_name(raw)
    if arch == "t5" and stored is not None:
        llm_overrides.setdefault("dtype", stored)
    # The arch picks the layout of the built-in tiny tokenizer (T5's ids differ from the others').
    tokenizer = build_tokenizer(spec, "llm", arch=arch)
    llm_overrides["tokenizer"] = spec
    nested["init_checkpoint"] = str(model_dir)
    cfg = ours_config_from_hf(raw, tokenizer, nested)
    _warn_on_token_mismatch(cfg, tokenizer, text)
    return cfg


# ------------------------------------------------------------------------------ export
def hf_state_dict_from_ours(model: Blip2ForLLM) -> dict[str, torch.Tensor]:
    """The whole model under transformers names, TP shards gathered, on the CPU.

    Collective over the TP group (every TP rank calls it). A tied head appears as
    ``language_model.lm_head.weight`` too, as transformers' ``state_dict()`` has it.
    """
    llm = export_hf_state_dict(model.language_model)  # first: it refuses a quantized LLM by name
    names = hf_names(model)
    tensors = {
        names[name]: param.detach().cpu()
        for name, param in model.named_parameters()
        if not name.startswith(HF_LLM_PREFIX)
    }
    for name, tensor in llm.items():
        tensors[HF_LLM_PREFIX + name] = tensor
    return tensors


def _image_processor_config(cfg: Blip2Config) -> dict[str, Any]:
    """transformers' BlipImageProcessor settings equal to our eval transform."""
    size = cfg.vision.image_size
    return {
        "image_processor_type": "BlipImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
    }


def _write_hf_dir(
    directory: Path,
    cfg: Blip2Config,
    tensors: dict[str, torch.Tensor],
    tokenizer: Any,
    qformer_tokenizer: Any,
) -> None:
    from safetensors.torch import save_file

    if cfg.llm.tie_word_embeddings:
        tensors.pop(HF_LM_HEAD, None)  # safetensors refuses shared storage; transformers re-ties it
    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(directory / "model.safetensors"),
        {"format": "pt"},
    )
    hf_config_from_ours(cfg).save_pretrained(directory)
    llm = cfg.llm
    # T5 decodes from its pad id (transformers' T5 default, which LAVIS's generate uses too).
    start = dict(decoder_start_token_id=llm.pad_token_id) if llm.is_encoder_decoder else {}
    transformers.GenerationConfig(
        bos_token_id=llm.bos_token_id, eos_token_id=llm.eos_token_id, pad_token_id=llm.pad_token_id, **start
    ).save_pretrained(directory)
    (directory / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(cfg), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if qformer_tokenizer is not None:
        qformer_tokenizer.save_pretrained(directory / QFORMER_TOKENIZER_DIR)
        # Instructions are cut on the left (LAVIS; Salesforce's directories say so too); a side
        # set after the tokenizer was made is not saved by save_pretrained.
        settings_file = directory / QFORMER_TOKENIZER_DIR / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        settings_file.write_text(json.dumps({**settings, "truncation_side": "left"}, indent=2))
    if cfg.instruction_aware:  # what InstructBlipProcessor.from_pretrained needs besides the tokenizers
        processor = {
            "processor_class": "InstructBlipProcessor",
            "num_query_tokens": cfg.qformer.num_query_tokens,
        }
        (directory / "processor_config.json").write_text(json.dumps(processor, indent=2))


def export_hf_blip2(
    model: Blip2ForLLM,
    out_dir: str | Path,
    tokenizer: Any = None,
    overwrite: bool = False,
    qformer_tokenizer: Any = None,
) -> Path:
    """Write ``model`` as a transformers Blip2 directory (config.json, model.safetensors, ...).

    ``from_pretrained(out_dir)`` gives the same weights. The tokenizer is written when
    given. An instruction-aware model is written as an InstructBlip directory, its
    ``qformer_tokenizer`` (when given) in the sub-folder InstructBlipProcessor reads. The directory is written under a temporary name and renamed, so it is never
    left half-written; an existing ``out_dir`` is replaced only with ``overwrite``.
    Collective over the TP group; one rank (TP 0, DP 0) writes.
    """
    if model.cfg.llm is None or not model.holds_whole_model:
        raise ValueError("export_hf_blip2 needs a whole LLM model on one rank (llm.pp=1)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    if model.cfg.vision.ln_vision_eps != model.cfg.vision.layer_norm_eps:
        logger.warning(
            "vision.ln_vision_eps=%g is exported as layer_norm_eps=%g (transformers has one epsilon)",
            model.cfg.vision.ln_vision_eps,
            model.cfg.vision.layer_norm_eps,
        )
    tensors = hf_state_dict_from_ours(model)
    if state.tp_rank() == 0 and state.dp_rank() == 0:
        with atomic_directory(out_dir, overwrite=overwrite) as partial:
            _write_hf_dir(partial, model.cfg, tensors, tokenizer, qformer_tokenizer)
        kind = "InstructBlip" if model.cfg.instruction_aware else "Blip2"
        logger.info("wrote a transformers %s directory to %s (%d tensors)", kind, out_dir, len(tensors))
    if state.tp_size() > 1:
        torch.distributed.barrier(group=state.tp_group())
    return out_dir


# ------------------------------------------------------------------------------ inputs
def hf_inputs_from_batch(
    cfg: Blip2Config, tokenizer: Any, samples: dict[str, Any], hf_cfg: Any, qformer_tokenizer: Any = None
) -> dict[str, torch.Tensor]:
    """transformers Blip2 inputs equal to ours: image-token placeholders in the query slots.

    With an encoder-decoder LLM (T5) these are the encoder's inputs, and ``labels`` the
    decoder's targets (transformers' T5 shifts them right behind its start token, as ours does).
    An instruction-aware model (InstructBlip) needs ``qformer_tokenizer`` and adds the
    instructions' ``qformer_input_ids`` / ``qformer_attention_mask``.
    """
    batch = LLMBatchBuilder(tokenizer, cfg, qformer_tokenizer=qformer_tokenizer)(samples)
    instruction = {k: batch[k] for k in ("qformer_input_ids", "qformer_attention_mask") if k in batch}
    return {
        "pixel_values": batch["image"],
        "input_ids": batch["input_ids"].masked_fill(batch["image_slots"], hf_cfg.image_token_index),
        "attention_mask": batch["attention_mask"],
        "labels": batch["labels"],
        **instruction,
    }
