"""Hugging Face OPT / LLaMA-family causal LMs <-> :class:`~blip2_megatron.models.llm.ParallelCausalLM`.

Names are mapped by explicit key templates (``{}`` is the global layer index); each rank
reads only its tensor-parallel shard of every tensor, sliced along the parameter's partition
dimension (megatron-core marks it on each parameter as ``partition_dim``):

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

Export (:func:`export_hf_state_dict`) gathers the TP shards back into full tensors under
Hugging Face names; :func:`save_hf_llm` writes a directory that ``transformers`` loads.
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
from blip2_megatron.io import CheckpointMismatchError, UnsafeCheckpointError, iter_checkpoint_files
from blip2_megatron.models.llm import ParallelCausalLM, gather_from_tp_ranks
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
KEY_MAPS = {"opt": (OPT_MODEL_KEYS, OPT_LAYER_KEYS), "llama": (LLAMA_MODEL_KEYS, LLAMA_LAYER_KEYS)}

# Checkpoint entries that are not weights: older LLaMA / Vicuna files store the RoPE
# frequencies, which we recompute.
IGNORED_HF_KEYS = (re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),)
# Our parameters whose rows are vocabulary entries (padded to a multiple of the TP size).
VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")
LLAMA_FAMILY = ("llama",)  # Vicuna and other LLaMA fine-tunes use model_type "llama"


# --------------------------------------------------------------------------- configs
def llm_config_from_hf(hf_config: Mapping[str, Any], **overrides: Any) -> LLMConfig:
    """An :class:`LLMConfig` from a Hugging Face ``config.json`` dict (OPT or LLaMA family).

    ``overrides`` set any other LLMConfig field (``tp``, ``pp``, ``dtype``, ``weights`` ...).
    For OPT the end-of-text id is not taken from the checkpoint: BLIP-2 ends captions with
    "\\n" (LLMConfig's default, 50118), not OPT's "</s>"; override ``eos_token_id`` to change it.
    Variants we do not implement (OPT-350M's post-LN and projections, RoPE scaling, MLP
    biases, non-SiLU activations) are refused with the offending key named.
    """
    hf = dict(hf_config)
    model_type = hf.get("model_type")
    if model_type == "opt":
        if not hf.get("do_layer_norm_before", True):
            raise ConfigError("OPT with do_layer_norm_before=false (post-LN, OPT-350M) is not supported")
        if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
            raise ConfigError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
        if hf.get("activation_function", "relu") != "relu":
            raise ConfigError(
                f"OPT activation_function={hf['activation_function']!r} is not supported (relu)"
            )
        if not hf.get("layer_norm_elementwise_affine", True):
            raise ConfigError("OPT with layer_norm_elementwise_affine=false is not supported")
        fields = dict(
            arch="opt",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["ffn_dim"],
            max_position_embeddings=hf["max_position_embeddings"],
            norm_eps=1e-5,  # nn.LayerNorm's default; OPT configs do not store it
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            attention_bias=hf.get("enable_bias", True),
            bos_token_id=hf.get("bos_token_id", 2),
            pad_token_id=hf.get("pad_token_id", 1),
        )
    elif model_type == "internlm2":
        raise ConfigError(
            "InternLM2 checkpoints store a fused attention.wqkv and other key names; convert them to the "
            "LLaMA layout first (the decoder itself is LLaMA-family: arch='llama')"
        )
    elif model_type in LLAMA_FAMILY:
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} (rope_parameters / rope_scaling) is not supported")
        if hf.get("mlp_bias", False):
            raise ConfigError("mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={hf['hidden_act']!r} is not supported (silu)")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        if head_dim * hf["num_attention_heads"] != hf["hidden_size"]:
            raise ConfigError(f"head_dim={head_dim} x num_attention_heads != hidden_size is not supported")
        fields = dict(
            arch="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", hf.get("bias", False)),
            bos_token_id=hf.get("bos_token_id", 1),
            eos_token_id=hf.get("eos_token_id", 2),
            pad_token_id=hf["pad_token_id"] if hf.get("pad_token_id") is not None else 0,
        )
    else:
        raise ConfigError(f"model_type {model_type!r} is not supported (opt and llama-family are)")
    if isinstance(fields.get("eos_token_id"), list):
        fields["eos_token_id"] = fields["eos_token_id"][0]
    fields.update(overrides)
    return LLMConfig(**fields)


def hf_config_dict(cfg: LLMConfig) -> dict[str, Any]:
    """A transformers ``config.json`` dict (OPTConfig / LlamaConfig) describing ``cfg``."""
    import transformers

    if cfg.arch == "opt":
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
    else:
        hf = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            attention_bias=cfg.attention_bias,
            tie_word_embeddings=cfg.tie_word_embeddings,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
        )
        hf.architectures = ["LlamaForCausalLM"]
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
    ``*ForCausalLM`` (checkpoints of the bare ``OPTModel`` / ``LlamaModel`` lack the prefix).
    """

    def __init__(self) -> None:
        self._location: dict[str, tuple[Any, str]] = {}  # our key -> (container, key inside it)
        self._handles: list[Any] = []

    @classmethod
    def from_state_dict(cls, tensors: Mapping[str, torch.Tensor]) -> HFTensors:
        source = cls()
        for name in tensors:
            source._add(name, tensors, name)
        return source

    @classmethod
    def from_directory(cls, model_dir: str | Path) -> HFTensors:
        from safetensors import safe_open

        source = cls()
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
        if not name.startswith(("model.", "lm_head.")):
            name = "model." + name  # a bare OPTModel / LlamaModel checkpoint
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
def hf_name_map(model: ParallelCausalLM) -> dict[str, str]:
    """Our parameter names (on this stage) -> Hugging Face names."""
    model_keys, layer_keys = KEY_MAPS[model.cfg.arch]
    names: dict[str, str] = {}
    for name, _ in model.named_parameters():
        if name.startswith("layers."):
            local_index, rest = name[len("layers.") :].split(".", 1)
            layer = model.layers[int(local_index)]
            names[name] = layer_keys[rest].format(layer.layer_index)
        else:
            names[name] = model_keys[name]
    return names


def _is_known_hf_key(cfg: LLMConfig, name: str) -> bool:
    """Whether ``name`` belongs to this architecture's checkpoint at all (any layer, any stage)."""
    model_keys, layer_keys = KEY_MAPS[cfg.arch]
    if name in model_keys.values() or any(p.fullmatch(name) for p in IGNORED_HF_KEYS):
        return True
    for template in layer_keys.values():
        prefix, suffix = template.split("{}")
        if name.startswith(prefix) and name.endswith(suffix):
            index = name[len(prefix) : len(name) - len(suffix)]
            if index.isdigit() and int(index) < cfg.num_layers:
                return True
    return False


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
@torch.no_grad()
def load_hf_llm_weights(
    model: ParallelCausalLM, source: str | Path | Mapping[str, torch.Tensor] | HFTensors, strict: bool = True
) -> list[str]:
    """Copy this rank's shard of a Hugging Face checkpoint into ``model``; return the HF keys used.

    ``source`` is a model directory, a state dict (HF names) or an :class:`HFTensors`.
    Keys of layers on other pipeline stages are skipped silently. ``strict``: unexpected keys
    (names no OPT / LLaMA checkpoint has) raise; otherwise they are logged. Missing keys and
    shape mismatches always raise :class:`CheckpointMismatchError` naming the tensors.
    """
    if isinstance(source, (str, Path)):
        source = HFTensors.from_directory(source)
    elif not isinstance(source, HFTensors):
        source = HFTensors.from_state_dict(source)
    cfg = model.cfg
    unexpected = sorted(k for k in source.keys() if not _is_known_hf_key(cfg, k))
    if unexpected:
        message = f"{len(unexpected)} unexpected keys in the checkpoint for a {cfg.arch} model: {unexpected}"
        if strict:
            raise CheckpointMismatchError(message)
        logger.warning(message)

    names = hf_name_map(model)
    tied_source = KEY_MAPS[cfg.arch][0]["embed_tokens.weight"]
    missing: list[str] = []
    plan: list[tuple[str, str, torch.Tensor]] = []
    for our_name, param in model.named_parameters():
        hf_name = names[our_name]
        if our_name == "lm_head.weight" and cfg.tie_word_embeddings:
            # A tied head on a stage without the embedding keeps a copy of the embedding;
            # checkpoints saved with tying usually drop lm_head.weight.
            hf_name = hf_name if hf_name in source else tied_source
        if hf_name not in source:
            missing.append(hf_name)
        else:
            plan.append((our_name, hf_name, param))
    if missing:
        raise CheckpointMismatchError(f"{len(missing)} tensors missing from the checkpoint: {missing}")

    rank = state.tp_rank()
    for our_name, hf_name, param in plan:
        expected = _expected_hf_shape(model, our_name, param)
        found = source.shape(hf_name)
        if found != expected:
            raise CheckpointMismatchError(
                f"{hf_name}: checkpoint shape {found} does not match the model's {expected} (our {our_name})"
            )
        dim = _partition(param)
        if dim is None:
            param.copy_(source.read(hf_name))
            continue
        local = param.shape[dim]
        start, stop = rank * local, min((rank + 1) * local, expected[dim])
        if stop > start:
            shard = source.read(hf_name, dim, start, stop)
            param.narrow(dim, 0, stop - start).copy_(shard)
        if stop - start < local:  # vocabulary padding rows of the last rank(s)
            param.narrow(dim, max(stop - start, 0), local - max(stop - start, 0)).zero_()
    logger.info("loaded %d tensors into LLM layers %s (tp rank %d)", len(plan), model.layer_range, rank)
    return [hf_name for _, hf_name, _ in plan]


# --------------------------------------------------------------------------- export
@torch.no_grad()
def export_hf_state_dict(model: ParallelCausalLM) -> dict[str, torch.Tensor]:
    """This stage's weights as full (TP-gathered) CPU tensors under Hugging Face names.

    Collective over the TP group: every TP rank must call it. The vocabulary padding is
    dropped. A tied head is exported as ``lm_head.weight`` too (the same tensor as the
    embedding), as ``*ForCausalLM.state_dict()`` does. With pipeline stages each stage
    exports its own part; merging the dicts gives the whole model.
    """
    names = hf_name_map(model)
    exported: dict[str, torch.Tensor] = {}
    for our_name, param in model.named_parameters():
        dim = _partition(param)
        full = param.detach() if dim is None else gather_from_tp_ranks(param.detach(), dim)
        if our_name in VOCAB_PARAMS:
            full = full[: model.vocab_size]
        exported[names[our_name]] = full.cpu()
    if model.post_process and model.pre_process and model.tie_word_embeddings:
        exported[KEY_MAPS[model.cfg.arch][0]["lm_head.weight"]] = exported[names["embed_tokens.weight"]]
    return exported


def save_hf_llm(model: ParallelCausalLM, out_dir: str | Path) -> Path | None:
    """Write a Hugging Face directory (config.json + model.safetensors) for a whole-model LLM.

    Collective over the TP group; TP rank 0 writes (returns the directory, others None).
    Pipeline stages are not merged here: export each stage and merge the dicts.
    """
    if not (model.pre_process and model.post_process and model.layer_range == (0, model.cfg.num_layers)):
        raise ValueError(
            "save_hf_llm needs the whole model on one stage; merge export_hf_state_dict() of the stages"
        )
    tensors = export_hf_state_dict(model)
    if state.tp_rank() != 0:
        return None
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if model.tie_word_embeddings:
        tensors.pop(KEY_MAPS[model.cfg.arch][0]["lm_head.weight"], None)  # safetensors refuses shared storage
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"), {"format": "pt"}
    )
    (out_dir / "config.json").write_text(json.dumps(hf_config_dict(model.cfg), indent=2, sort_keys=True))
    logger.info("wrote a Hugging Face %s model to %s", model.cfg.arch, out_dir)
    return out_dir
