"""Build a BLIP-2 model from its config: tokenizers, modules, initial weights, freezing.

The one place that decides which class a config becomes and where its starting weights
come from:

* ``model.init_checkpoint``: comma-separated sources for the vision encoder, Q-Former,
  queries, projection (and stage-1 heads): a Hugging Face Blip2 directory, LAVIS ``.pth``
  files (``blip2_pretrained.pth``, ``blip2_pretrained_opt2.7b.pth``, ``eva_vit_g.pth``),
  or a safetensors file with our own names. Later sources override earlier ones.
* ``model.llm.weights``: a Hugging Face OPT / LLaMA directory, read shard by shard for
  this rank's tensor-parallel slice and pipeline stage. A Hugging Face Blip2 directory in
  ``init_checkpoint`` also supplies the LLM when ``llm.weights`` is empty.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2_megatron.config import Blip2Config
from blip2_megatron.convert.io import iter_checkpoint_files, load_state_dict_file
from blip2_megatron.convert.vision_qformer import hf_vision_qformer_to_ours, lavis_to_ours, load_into
from blip2_megatron.models.tokenizers import build_tokenizer

logger = logging.getLogger(__name__)

# LAVIS / MiniGPT-4 names of the query -> LLM projection.
LAVIS_PROJECTION_PREFIXES = ("opt_proj.", "llm_proj.", "llama_proj.", "t5_proj.")
HF_LLM_PREFIX = "language_model."


def build_tokenizers(cfg: Blip2Config) -> tuple[Any, Any]:
    """(Q-Former tokenizer or None, LLM tokenizer or None) as the model kind needs them."""
    qformer_tok = build_tokenizer(cfg.qformer.tokenizer, "qformer") if cfg.kind == "stage1" else None
    llm_tok = None
    if cfg.llm is not None:
        spec = cfg.llm.tokenizer or cfg.llm.weights or _hf_blip2_dir(cfg) or ""
        llm_tok = build_tokenizer(spec, "llm", arch=cfg.llm.arch)
    return qformer_tok, llm_tok


def _sources(cfg: Blip2Config) -> list[Path]:
    return [Path(p.strip()) for p in cfg.init_checkpoint.split(",") if p.strip()]


def _is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _hf_blip2_dir(cfg: Blip2Config) -> str | None:
    dirs = [p for p in _sources(cfg) if _is_hf_dir(p)]
    return str(dirs[-1]) if dirs else None


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in iter_checkpoint_files(path):
        tensors.update(load_state_dict_file(file))
    return tensors


def _convert_source(path: Path, cfg: Blip2Config) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(our non-LLM tensors, HF-named LLM tensors) from one init_checkpoint source."""
    if not path.exists():
        raise FileNotFoundError(f"model.init_checkpoint: {path} does not exist")
    if path.is_dir():
        raw = _read_hf_dir(path)
        ours, rest = hf_vision_qformer_to_ours(raw)
        llm = {k[len(HF_LLM_PREFIX) :]: raw[k] for k in rest if k.startswith(HF_LLM_PREFIX)}
        for key in rest:
            if key.startswith("language_projection."):
                ours[key] = raw[key]
        return ours, llm
    raw = load_state_dict_file(path)
    if any(k.startswith("query_encoder.") for k in raw):  # already our names
        return dict(raw), {}
    raw = raw.get("model", raw) if isinstance(raw.get("model"), dict) else raw
    ours, rest = lavis_to_ours(raw, num_vision_layers=cfg.vision.num_layers)
    for key in rest:
        for prefix in LAVIS_PROJECTION_PREFIXES:
            if key.startswith(prefix):
                ours["language_projection." + key[len(prefix) :]] = raw[key]
    return ours, {}


def _without_llm(model: nn.Module) -> nn.Module:
    """A view of ``model`` without ``language_model`` (loaded separately, shard by shard)."""
    view = nn.Module()
    for name, child in model.named_children():
        if name != "language_model":
            view.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        view.register_parameter(name, param)
    return view


def load_initial_weights(model: nn.Module, cfg: Blip2Config) -> None:
    """Load ``init_checkpoint`` and ``llm.weights`` into ``model`` (one pipeline stage of it)."""
    target = _without_llm(model)
    own = set(target.state_dict())
    hf_llm: dict[str, torch.Tensor] = {}
    for source in _sources(cfg):
        ours, llm = _convert_source(source, cfg)
        hf_llm.update(llm)
        # Parts that live on other pipeline stages are not this stage's business;
        # load_into logs what the source lacks by name.
        load_into(target, {k: v for k, v in ours.items() if k in own})
        logger.info("initialised from %s", source)
    language_model = getattr(model, "language_model", None)
    if language_model is None:
        return
    from blip2_megatron.convert.hf_llm import load_hf_llm_weights

    if cfg.llm.weights:
        load_hf_llm_weights(language_model, cfg.llm.weights)
    elif hf_llm:
        load_hf_llm_weights(language_model, hf_llm)


def build_model(
    cfg: Blip2Config,
    device: torch.device | str | None = None,
    pre_process: bool = True,
    post_process: bool = True,
    layer_range: tuple[int, int] | None = None,
) -> nn.Module:
    """The model ``cfg`` describes (this rank's TP shard / pipeline stage), weights loaded, frozen parts frozen."""
    from blip2_megatron.models.stage1 import Blip2Stage1

    qformer_tok, llm_tok = build_tokenizers(cfg)
    if cfg.kind == "stage1":
        model: nn.Module = Blip2Stage1(cfg, qformer_tok)
    else:
        from blip2_megatron.models.blip2 import Blip2ForLLM

        model = Blip2ForLLM(
            cfg, llm_tok, pre_process=pre_process, post_process=post_process, layer_range=layer_range
        )
    load_initial_weights(model, cfg)  # copies into the frozen parts keep their (half) dtype
    if device is not None:
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.2fM parameters, %.2fM trainable", cfg.kind, total / 1e6, trainable / 1e6)
    return model
