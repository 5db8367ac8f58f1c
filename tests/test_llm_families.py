"""LLM families by config detection: LLaMA 3 (RoPE scaling), Qwen2, Mistral, InternLM2.

Each family against transformers on tiny random configs (CPU fp32, the tolerances of
tests/test_llm_parity.py): logits and loss with right and left padding, greedy and beam
generation token-identical, and TP=2 (two gloo processes) equal to the same reference.
transformers ships no InternLM2 model: its checkpoint is built here from a tiny LLaMA by
fusing q/k/v into InternLM2's per-group ``attention.wqkv`` and renaming every tensor
(written independently of the converter), and our logits from that directory must equal
transformers' LlamaForCausalLM on the original.

Also: what must be refused is refused by name (a Qwen2 checkpoint whose biases the config
denies, RoPE types we do not model, config keys we do not read, a directory describing
another model, dynamic RoPE beyond its window); Mistral's window is modelled (sequences and
generations longer than the window match transformers); InternLM2's sentencepiece tokenizer
loads without remote code and encodes as sentencepiece does; a tiny BLIP-2 + InternLM2 job
trains and answers VQA questions by answer type through the launch scripts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from test_generation import assert_generates_like
from test_llm_parity import HIDDEN, TOL, VOCAB, assert_logits_close, make_batch, randomize

from blip2_megatron.build import build_llm_from_hf
from blip2_megatron.config import ConfigError, build_model_config
from blip2_megatron.convert.hf_llm import (
    export_hf_state_dict,
    llm_config_from_hf,
    load_hf_llm_weights,
    read_hf_config,
    save_hf_llm,
)
from blip2_megatron.io import CheckpointMismatchError
from blip2_megatron.models.llm import ParallelCausalLM

transformers = pytest.importorskip("transformers")

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# name -> (transformers class prefix, config kwargs). The "internlm2*" entries are the LLaMA
# models their InternLM2 checkpoints are fused from.
FAMILIES = {
    # Llama 3.1's scaling; head_dim 16 and base 10000 put wavelengths below 64 / 4, between
    # and above 64, so each of its three regimes is used.
    "llama3": (
        "Llama",
        dict(
            _COMMON,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama_linear": (
        "Llama",
        dict(_COMMON, rope_parameters=dict(rope_type="linear", rope_theta=500.0, factor=2.0)),
    ),
    # Qwen2-0.5B-like: GQA, q/k/v biases without an o_proj bias, head tied to the embedding.
    "qwen2": (
        "Qwen2",
        dict(
            _COMMON, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=dict(rope_theta=500.0)
        ),
    ),
    # A window of 5 slots, shorter than every test sequence and generation.
    "mistral": (
        "Mistral",
        dict(_COMMON, num_key_value_heads=2, sliding_window=5, rope_parameters=dict(rope_theta=500.0)),
    ),
    # InternLM2's settings: GQA, base 1e6, eps 1e-5, dynamic NTK RoPE (max_position_embeddings 64).
    "internlm2": (
        "Llama",
        dict(
            _COMMON,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="dynamic", rope_theta=1_000_000.0, factor=2.0),
        ),
    ),
    # InternLM2 with bias=true: a fused wqkv bias and a wo bias; one head per group.
    "internlm2_bias": ("Llama", dict(_COMMON, attention_bias=True, rope_parameters=dict(rope_theta=500.0))),
}


# What config detection must call each one (the checkpoint layout it reads).
DETECTED_FAMILY = {
    "llama3": "llama",
    "llama_linear": "llama",
    "qwen2": "qwen2",
    "mistral": "mistral",
    "internlm2": "internlm2",
    "internlm2_bias": "internlm2",
}


def make_reference(name: str, seed: int = 0):
    """The family's tiny transformers model (eval mode, eager attention), random weights."""
    kind, kwargs = FAMILIES[name]
    config = getattr(transformers, f"{kind}Config")(**kwargs, attn_implementation="eager")
    torch.manual_seed(seed)
    model = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    randomize(model, seed)
    return model


# ------------------------------------------------------------------------------ InternLM2
# LLaMA name -> InternLM2 name ("{}" = layer); q/k/v are fused separately.
_INTERNLM2_RENAMES = {
    "model.embed_tokens.weight": "model.tok_embeddings.weight",
    "model.norm.weight": "model.norm.weight",
    "lm_head.weight": "output.weight",
}
_INTERNLM2_LAYER_RENAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "self_attn.o_proj.bias": "attention.wo.bias",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}


def fuse_per_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """InternLM2's wqkv rows: for each key/value group, its query heads, its key head, its value head."""
    head_dim = k.shape[0] // kv_heads
    q_rows = q.shape[0] // kv_heads  # the query heads of one group
    blocks = []
    for group in range(kv_heads):
        blocks.append(q[group * q_rows : (group + 1) * q_rows])
        blocks.append(k[group * head_dim : (group + 1) * head_dim])
        blocks.append(v[group * head_dim : (group + 1) * head_dim])
    return torch.cat(blocks)


def internlm2_state_dict(llama) -> dict[str, torch.Tensor]:
    config, tensors = llama.config, llama.state_dict()
    out = {new: tensors[old] for old, new in _INTERNLM2_RENAMES.items()}
    for layer in range(config.num_hidden_layers):
        ours = f"model.layers.{layer}."
        for kind in ("weight", "bias"):
            parts = [tensors.get(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"]
            if parts[0] is not None:
                out[f"{ours}attention.wqkv.{kind}"] = fuse_per_group(*parts, config.num_key_value_heads)
        for old, new in _INTERNLM2_LAYER_RENAMES.items():
            if ours + old in tensors:
                out[ours + new] = tensors[ours + old]
    assert not any(".self_attn." in key or ".mlp." in key for key in out)
    return out


def internlm2_config(llama) -> dict:
    """A config.json as InternLM2's published checkpoints write it (their key names)."""
    c = llama.config
    rope = dict(c.rope_parameters)
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "attn_implementation": "eager",
        "bias": c.attention_bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "model_type": "internlm2",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_scaling": None
        if rope["rope_type"] == "default"
        else {"type": "dynamic", "factor": rope["factor"]},
        "rope_theta": rope["rope_theta"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.41.0",
        "use_cache": True,
        "vocab_size": c.vocab_size,
    }


def write_internlm2_dir(llama, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in internlm2_state_dict(llama).items()}
    save_file(tensors, str(directory / "model.safetensors"), {"format": "pt"})
    (directory / "config.json").write_text(json.dumps(internlm2_config(llama), indent=2))
    return directory


def make_ours(name: str, reference, tmp_dir: Path, tp: int = 1) -> ParallelCausalLM:
    """Our model with the reference's weights, read the way a user's checkpoint is read."""
    if name.startswith("internlm2"):
        return build_llm_from_hf(write_internlm2_dir(reference, tmp_dir / name), tp=tp).eval()
    cfg = llm_config_from_hf(reference.config.to_dict(), tp=tp)
    model = ParallelCausalLM(cfg, init_weights=False).eval()
    load_hf_llm_weights(model, reference.state_dict())
    return model


# ------------------------------------------------------------------------------ parity, TP=1
@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("padding", ["right", "left"])
def test_logits_and_loss_match_transformers(single_process_group, tmp_path, name, padding):
    ref_model = make_reference(name)
    ours = make_ours(name, ref_model, tmp_path)
    assert ours.cfg.hf_family == DETECTED_FAMILY[name]
    input_ids, mask, labels = make_batch(padding=padding)
    with torch.no_grad():
        ref = ref_model(input_ids=input_ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
    assert_logits_close(out.logits, ref.logits, mask)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_generation_is_token_identical_to_transformers(single_process_group, tmp_path, name):
    ref_model = make_reference(name)
    ours = make_ours(name, ref_model, tmp_path)
    assert_generates_like(ref_model, ours, ("greedy", "beam3", "beam3_return2_lp"), name)


def test_mistral_window_is_shorter_than_the_sequences_and_matters(single_process_group, tmp_path):
    """The parity above is not vacuous: without the window the same weights give other logits."""
    ref_model = make_reference("mistral")
    ours = make_ours("mistral", ref_model, tmp_path)
    assert ours.cfg.sliding_window == 5
    input_ids, mask, _ = make_batch(padding="right")
    assert input_ids.shape[1] > 2 * ours.cfg.sliding_window
    unwindowed = ParallelCausalLM(
        llm_config_from_hf(ref_model.config.to_dict(), sliding_window=0), init_weights=False
    ).eval()
    load_hf_llm_weights(unwindowed, ref_model.state_dict())
    with torch.no_grad():
        windowed_logits = ours(input_ids=input_ids, attention_mask=mask).logits
        plain_logits = unwindowed(input_ids=input_ids, attention_mask=mask).logits
    late = mask.bool().clone()
    late[:, : ours.cfg.sliding_window] = False  # positions that see a whole window are the same
    assert (windowed_logits - plain_logits)[late].abs().max() > 1e-2


def test_internlm2_fused_layout_is_the_one_its_attention_reads(single_process_group):
    """The test's wqkv is split back the way InternLM2's attention splits its output
    (``(h gs d) -> h gs d``; queries first in each group, then key, then value)."""
    llama = make_reference("internlm2")
    attn = llama.model.layers[0].self_attn
    kv_heads, head_dim = llama.config.num_key_value_heads, llama.config.head_dim
    wqkv = fuse_per_group(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, kv_heads)
    x = torch.randn(2, 5, HIDDEN)
    grouped = (x @ wqkv.T).view(2, 5, kv_heads, -1, head_dim)
    q = grouped[..., :-2, :].reshape(2, 5, -1)
    k, v = grouped[..., -2, :].reshape(2, 5, -1), grouped[..., -1, :].reshape(2, 5, -1)
    with torch.no_grad():
        torch.testing.assert_close(q, attn.q_proj(x))
        torch.testing.assert_close(k, attn.k_proj(x))
        torch.testing.assert_close(v, attn.v_proj(x))


@pytest.mark.parametrize("name", ["internlm2", "internlm2_bias"])
def test_internlm2_export_writes_its_own_layout_back(single_process_group, tmp_path, name):
    llama = make_reference(name)
    source = write_internlm2_dir(llama, tmp_path / "source")
    ours = build_llm_from_hf(source)
    out = save_hf_llm(ours, tmp_path / "export")
    from safetensors.torch import load_file

    written, original = (
        load_file(str(out / "model.safetensors")),
        load_file(str(source / "model.safetensors")),
    )
    assert sorted(written) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(written[key], tensor), key
    exported_config = read_hf_config(out)
    assert (
        exported_config["model_type"] == "internlm2"
        and exported_config["bias"] == llama.config.attention_bias
    )
    assert llm_config_from_hf(exported_config) == llm_config_from_hf(read_hf_config(source))


@pytest.mark.parametrize("name", ["llama3", "llama_linear", "qwen2", "mistral"])
def test_export_round_trips_through_transformers(single_process_group, tmp_path, name):
    ref_model = make_reference(name)
    ours = make_ours(name, ref_model, tmp_path)
    save_hf_llm(ours, tmp_path / "export")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is type(ref_model)
    expected = ref_model.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    assert llm_config_from_hf(read_hf_config(tmp_path / "export")) == llm_config_from_hf(
        ref_model.config.to_dict()
    )


# Blip2 text configs: sizes of tests/test_blip2_hf.py's LLaMA, in Qwen2's and Mistral's
# forms (the window, 6 slots, is shorter than 8 query slots plus a caption).
BLIP2_TEXT = {
    "qwen2": ("Qwen2Config", dict(rope_parameters=dict(rope_theta=500.0))),
    "mistral": ("MistralConfig", dict(sliding_window=6, rope_parameters=dict(rope_theta=500.0))),
}


@pytest.mark.parametrize("family", list(BLIP2_TEXT))
def test_blip2_with_the_family_matches_transformers_and_exports_back(single_process_group, tmp_path, family):
    from test_blip2_hf import (
        CAPTIONS,
        IMAGE_TOKEN,
        QFORMER,
        SPECIAL_IDS,
        VISION,
        assert_same_outputs,
        images,
        load_hf_blip2,
        load_reference,
    )
    from test_blip2_hf import randomize as randomize_blip2

    from blip2_megatron.convert.hf_blip2 import export_hf_blip2
    from blip2_megatron.data.tokenizers import build_tokenizer

    text_class, text_kwargs = BLIP2_TEXT[family]
    sizes = dict(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=getattr(transformers, text_class)(**sizes, **text_kwargs, **SPECIAL_IDS).to_dict(),
        num_query_tokens=8,
        image_text_hidden_size=32,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(0)
    hf = transformers.Blip2ForConditionalGeneration(config).eval()
    randomize_blip2(hf)
    hf.save_pretrained(tmp_path / "hf")
    build_tokenizer("builtin:tiny", "llm").save_pretrained(tmp_path / "hf")

    ours, cfg = load_hf_blip2(tmp_path / "hf")
    assert cfg.llm.hf_family == family
    reference = load_reference(tmp_path / "hf")
    assert_same_outputs(ours, reference, {"image": images(), "text_input": CAPTIONS})
    reloaded = load_reference(export_hf_blip2(ours.module, tmp_path / "export"))
    assert type(reloaded.language_model) is type(reference.language_model)
    expected = reference.state_dict()
    assert sorted(reloaded.state_dict()) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key


def test_blip2_export_refuses_internlm2_saying_what_to_do():
    from blip2_megatron.convert.hf_blip2 import hf_text_config

    with pytest.raises(ConfigError, match="cannot hold a internlm2 LLM.*save_hf_llm"):
        hf_text_config(build_model_config("tiny_internlm2").llm)


# ------------------------------------------------------------------------------ refusals
def test_qwen2_biases_cannot_be_dropped(single_process_group, tmp_path):
    """A Qwen2 checkpoint forced into a bias-free model is refused, naming the bias tensors,
    whether the overrides or an edited config.json (claiming LLaMA without biases) deny them."""
    qwen = make_reference("qwen2")
    cfg = llm_config_from_hf(qwen.config.to_dict(), attention_bias=False)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_hf_llm_weights(ParallelCausalLM(cfg, init_weights=False), qwen.state_dict())

    qwen.save_pretrained(tmp_path / "qwen")
    original = read_hf_config(tmp_path / "qwen")
    edited = dict(original)
    for key in ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"):
        edited.pop(key)
    edited.update(model_type="llama", attention_bias=False)
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(edited))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*self_attn\.k_proj\.bias"):
        build_llm_from_hf(tmp_path / "qwen")

    # the same directory under a LLaMA-layout model of the right sizes: the config says why
    llama_cfg = llm_config_from_hf(edited)
    (tmp_path / "qwen" / "config.json").write_text(json.dumps(original))
    with pytest.raises(
        ConfigError, match=r"llm\.attention_bias=False but True there, llm\.family='llama' but 'qwen2' there"
    ):
        load_hf_llm_weights(ParallelCausalLM(llama_cfg, init_weights=False), tmp_path / "qwen")
    load_hf_llm_weights(ParallelCausalLM(llm_config_from_hf(original), init_weights=False), tmp_path / "qwen")


def test_unmodelled_features_are_refused_by_name():
    llama = make_reference("llama3").config.to_dict()
    for rope_type in ("yarn", "longrope"):
        params = dict(
            rope_type=rope_type, rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32
        )
        with pytest.raises(ConfigError, match=f"rope type '{rope_type}'"):
            llm_config_from_hf(dict(llama, rope_parameters=params))
    # old-style configs spell it rope_scaling / "type"
    with pytest.raises(ConfigError, match="rope type 'su'"):
        llm_config_from_hf(
            dict(llama, rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "su", "factor": 2})
        )
    with pytest.raises(ConfigError, match=r"not modelled \['beta_fast'\]"):
        llm_config_from_hf(dict(llama, rope_parameters=dict(llama["rope_parameters"], beta_fast=32)))
    # Quantized weights: bitsandbytes' 8-bit / NF4 are read as llm.quantize, other methods refused.
    with pytest.raises(ConfigError, match="quantization_config quant_method=None: only bitsandbytes"):
        llm_config_from_hf(dict(llama, quantization_config={"bits": 4}))
    int8 = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    assert llm_config_from_hf(dict(llama, quantization_config=int8)).quantize == "int8"
    with pytest.raises(ConfigError, match="mlp_bias=True"):
        llm_config_from_hf(dict(llama, mlp_bias=True))
    qwen = make_reference("qwen2").config.to_dict()
    with pytest.raises(ConfigError, match="use_sliding_window=true"):
        llm_config_from_hf(dict(qwen, use_sliding_window=True))
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.5"):
        llm_config_from_hf(dict(qwen, rope_parameters=dict(rope_theta=500.0, partial_rotary_factor=0.5)))


def test_config_detection_reads_each_family():
    read = {
        name: llm_config_from_hf(make_reference(name).config.to_dict())
        for name in ("llama3", "qwen2", "mistral")
    }
    llama3, qwen2, mistral = read["llama3"], read["qwen2"], read["mistral"]
    assert (llama3.rope_type, llama3.rope_factor, llama3.rope_original_max_positions, llama3.kv_heads) == (
        "llama3",
        8.0,
        64,
        2,
    )
    assert (qwen2.hf_family, qwen2.attention_bias, qwen2.has_o_proj_bias, qwen2.tie_word_embeddings) == (
        "qwen2",
        True,
        False,
        True,
    )
    assert (mistral.hf_family, mistral.sliding_window, mistral.attention_bias) == ("mistral", 5, False)
    # Qwen2 configs without a bos (its tokenizer adds none) keep it absent; pad falls back to eos
    no_bos = llm_config_from_hf(
        dict(make_reference("qwen2").config.to_dict(), bos_token_id=None, pad_token_id=None)
    )
    assert (no_bos.bos_token_id, no_bos.pad_token_id) == (None, 2)
    with pytest.raises(ConfigError, match="llm.family='internlm2' does not go with llm.arch='opt'"):
        build_model_config("tiny", {"llm": {"family": "internlm2"}})


def test_dynamic_rope_beyond_its_window_is_refused(single_process_group, tmp_path):
    llama = make_reference("internlm2")
    ours = make_ours("internlm2", llama, tmp_path)
    limit = ours.cfg.max_position_embeddings
    ours(input_ids=torch.randint(3, VOCAB, (1, limit)))  # up to the window: plain RoPE, as transformers
    with pytest.raises(
        ValueError, match=f"rope_type='dynamic'.*max_position_embeddings={limit}.*{limit + 1}"
    ):
        ours(input_ids=torch.randint(3, VOCAB, (1, limit + 1)))


def test_internlm2_flavour_sizes(single_process_group):
    from blip2_megatron.models.param_count import count_parameters

    llm = build_model_config("blip2_internlm2_1.8b").llm
    assert (llm.hidden_size, llm.num_layers, llm.num_heads, llm.kv_heads, llm.intermediate_size) == (
        2048,
        24,
        16,
        8,
        8192,
    )
    assert (llm.vocab_size, llm.rope_theta, llm.norm_eps, llm.tie_word_embeddings) == (
        92544,
        1e6,
        1e-5,
        False,
    )
    report = count_parameters(build_model_config("blip2_internlm2_1.8b"))
    # embedding + head 2 x 92544 x 2048, 24 layers of 62_918_656 (GQA q/k/v/o, SwiGLU, 2 norms), final norm
    assert report.parts["LLM"].total == 1_889_110_016


# ------------------------------------------------------------------------------ TP = 2
TP = 2


def _tp2_family_checks(rank: int, world_size: int, tmp_dir: str) -> dict[str, float]:
    from blip2_megatron.models.llm import gather_from_tp_ranks
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(TP, 1)
    diffs = {}
    for name in FAMILIES:
        ref_model = make_reference(name)  # same seed on every rank: identical weights
        ours = make_ours(name, ref_model, Path(tmp_dir) / f"rank{rank}", tp=TP)
        input_ids, mask, labels = make_batch()
        with torch.no_grad():
            ref = ref_model(input_ids=input_ids, attention_mask=mask, labels=labels)
            out = ours(input_ids=input_ids, attention_mask=mask, labels=labels)
        logits = gather_from_tp_ranks(out.logits)[..., :VOCAB]
        real = mask.bool()
        torch.testing.assert_close(logits[real], ref.logits[real], **TOL)
        torch.testing.assert_close(out.loss, ref.loss, **TOL)
        exported = export_hf_state_dict(ours)
        expected = internlm2_state_dict(ref_model) if name.startswith("internlm2") else ref_model.state_dict()
        assert sorted(exported) == sorted(expected), name
        for key, tensor in expected.items():
            assert torch.equal(exported[key], tensor), f"{name} {key}"
        if name in ("qwen2", "mistral", "internlm2"):
            assert_generates_like(ref_model, ours, ("greedy", "beam3_return2_lp"), name)
        diffs[name] = float((logits[real] - ref.logits[real]).abs().max())
    return diffs


@pytest.mark.dist
def test_tensor_parallel_2_matches_transformers_for_every_family(tmp_path):
    per_rank = run_distributed(_tp2_family_checks, TP, str(tmp_path))
    assert per_rank[0] == per_rank[1] and set(per_rank[0]) == set(FAMILIES)


# ------------------------------------------------------------------------------ tokenizer
_CORPUS = [
    "a red circle on the left of a blue square",
    "what colour is the triangle?\nIt is green.",
    "two small dogs playing in the park in 2024",
    "Question: how many shapes are there? Short answer: three",
    "a photo of a large yellow star at the top right",
]


def write_sentencepiece_tokenizer(directory: Path, vocab_size: int = 400, **options) -> Path:
    """A tiny sentencepiece BPE model trained here, with InternLM2's tokenizer_config.json."""
    import io

    spm = pytest.importorskip("sentencepiece")
    settings = dict(
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        user_defined_symbols=["<|im_end|>"],
        minloglevel=2,
    )
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 20),
        model_writer=model,
        vocab_size=vocab_size,
        **{**settings, **options},
    )
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {"3": {"content": "<|im_end|>", "special": True}},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_internlm2_tokenizer_loads_without_remote_code_and_encodes_as_sentencepiece(tmp_path, dummy_prefix):
    """InternLM2's tokenizer calls sentencepiece on each stretch between special tokens, after its bos."""
    spm = pytest.importorskip("sentencepiece")
    from blip2_megatron.data.batch import template_prefix_ids
    from blip2_megatron.data.tokenizers import build_tokenizer

    directory = write_sentencepiece_tokenizer(tmp_path / "tok", add_dummy_prefix=dummy_prefix)
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    reference = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = build_tokenizer(str(directory), "llm")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 2, 0)
    assert template_prefix_ids(tok) == [1]
    texts = [
        "a red circle? Zebra ünïcode  two  spaces\nnew line",
        " leading space",
        "trailing  ",
        "Question: what is 1234? Short answer:",
        "日本語 and tabs\there",
        "first<|im_end|>second part</s>",
    ]
    for text in texts:
        expected = [1]
        for stretch in re.split(r"(</s>|<\|im_end\|>)", text):
            if stretch in ("</s>", "<|im_end|>"):
                expected.append(reference.piece_to_id(stretch))
            elif stretch:
                expected += reference.encode(stretch)
        assert tok(text)["input_ids"] == expected, text
        if "<" not in text:
            assert tok.decode(expected, skip_special_tokens=True) == reference.decode(expected[1:]), text


def test_sentencepiece_normalisation_we_do_not_rebuild_is_refused(tmp_path):
    from blip2_megatron.data.tokenizers import build_tokenizer

    directory = write_sentencepiece_tokenizer(
        tmp_path / "nfkc", normalization_rule_name="nmt_nfkc", remove_extra_whitespaces=True
    )
    with pytest.raises(ConfigError, match="normalizer 'nmt_nfkc'.*remove_extra_whitespaces=true"):
        build_tokenizer(str(directory), "llm")


# ------------------------------------------------------------------------------ journey
@pytest.mark.slow
@pytest.mark.journey
def test_blip2_with_internlm2_trains_and_answers_vqa_by_answer_type(sample, tmp_path):
    """The shipped InternLM2 jobs at tiny size with a real InternLM2 directory: fused wqkv
    checkpoint and sentencepiece tokenizer, stage 2 for 3 steps, then zero-shot VQA."""
    from journeys import DS_CONFIGS, launch, step_records, tiny_overrides

    from blip2_megatron.config import load_job_config
    from blip2_megatron.parallel import state

    llm_dir = tmp_path / "internlm2-tiny"
    internlm2 = [
        "model.flavour=tiny_internlm2",
        f"model.llm.weights={llm_dir}",
        f"model.llm.tokenizer={llm_dir}",
    ]
    train_job = "stage2_internlm2_1.8b"
    overrides = [*tiny_overrides(train_job, sample), *internlm2]
    cfg = load_job_config(train_job, overrides).model.llm  # the LLM the job will build
    state.initialize_model_parallel(1, 1)
    try:
        torch.manual_seed(0)
        save_hf_llm(ParallelCausalLM(cfg, init_weights=True).eval(), llm_dir)
    finally:
        state.destroy()
    write_sentencepiece_tokenizer(llm_dir)
    assert read_hf_config(llm_dir)["model_type"] == "internlm2"

    run = tmp_path / "stage2"
    launch(
        "train.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        "--config",
        train_job,
        *overrides,
        f"train.output_dir={run}",
        "train.max_steps=3",
        "train.log_interval=1",
        "train.save_interval=0",
    )
    assert sorted(step_records(run)) == [1, 2, 3]
    assert load_job_config(str(run / "config.yaml")).model.llm.hf_family == "internlm2"

    eval_job = "vqa_zeroshot_internlm2_1.8b"
    out = tmp_path / "vqa"
    launch(
        "evaluate.py",
        "--checkpoint",
        str(run),
        "--config",
        eval_job,
        "--output",
        str(out),
        *tiny_overrides(eval_job, sample),
        *internlm2,
        "eval.max_samples=16",
        "eval.num_beams=2",
    )
    metrics = json.loads((out / "eval" / "metrics_vqa.json").read_text())
    assert metrics["num_evaluated"] == 16
    assert {"overall", "yes/no", "number", "other"} <= set(metrics)
    answers = json.loads((out / "eval" / "vqa_answers.json").read_text())
    assert len(answers) == 16 and all(isinstance(a["answer"], str) for a in answers)
