"""Hugging Face OPT / LLaMA checkpoints <-> ours: key maps, directories, errors (TP=1).

The TP=2 load-then-export round trip runs in tests/test_llm_tp.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_llm_parity import TOL, make_batch, make_hf_model, make_ours

from blip2_megatron.build import build_llm_from_hf
from blip2_megatron.config import ConfigError
from blip2_megatron.convert.hf_llm import (
    export_hf_state_dict,
    llm_config_from_hf,
    load_hf_llm_weights,
    save_hf_llm,
)
from blip2_megatron.io import CheckpointMismatchError, UnsafeCheckpointError
from blip2_megatron.models.llm import ParallelCausalLM

transformers = pytest.importorskip("transformers")


class PickledObject:
    """Stands for any Python object a checkpoint may pickle next to its weights."""


def assert_same_state_dict(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("name", ["opt", "llama_gqa", "llama_mha_bias"])
def test_round_trip_hf_ours_hf_is_identical(single_process_group, name):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    assert_same_state_dict(export_hf_state_dict(ours), hf.state_dict())


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded_safetensors", "bin"])
def test_load_from_a_saved_hf_directory(single_process_group, tmp_path, name, layout):
    hf = make_hf_model(name)
    kwargs = dict(safe_serialization=layout != "bin")
    if layout == "sharded_safetensors":
        kwargs["max_shard_size"] = "60KB"  # several files + model.safetensors.index.json
    hf.save_pretrained(tmp_path, **kwargs)
    if layout == "sharded_safetensors":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = build_llm_from_hf(tmp_path)
    assert ours.cfg.weights == str(tmp_path)
    assert_same_state_dict(export_hf_state_dict(ours), hf.state_dict())
    input_ids, mask, labels = make_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=input_ids, attention_mask=mask).logits,
            hf(input_ids=input_ids, attention_mask=mask).logits,
        )


@pytest.mark.parametrize("name", ["opt", "llama_gqa"])
def test_saved_directory_loads_in_transformers(single_process_group, tmp_path, name):
    hf = make_hf_model(name)
    ours = make_ours(hf)
    save_hf_llm(ours, tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_state_dict(reloaded.state_dict(), hf.state_dict())
    assert llm_config_from_hf(json.loads((tmp_path / "config.json").read_text())) == llm_config_from_hf(
        hf.config.to_dict()
    )


def test_bare_model_checkpoint_without_model_prefix(single_process_group):
    """Checkpoints of OPTModel (e.g. facebook/opt-*) name keys "decoder.*" without "model."."""
    hf = make_hf_model("opt")
    bare = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    cfg = llm_config_from_hf(hf.config.to_dict())
    ours = ParallelCausalLM(cfg, init_weights=False)
    load_hf_llm_weights(ours, bare)
    assert_same_state_dict(export_hf_state_dict(ours), hf.state_dict())


def test_shape_mismatch_names_the_tensor(single_process_group):
    hf = make_hf_model("llama_gqa")
    state = hf.state_dict()
    state["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # MHA-sized k for a GQA model
    cfg = llm_config_from_hf(hf.config.to_dict())
    with pytest.raises(
        CheckpointMismatchError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*\(64, 64\)"
    ):
        load_hf_llm_weights(ParallelCausalLM(cfg, init_weights=False), state)


def test_missing_and_unexpected_keys_are_named(single_process_group):
    hf = make_hf_model("opt")
    cfg = llm_config_from_hf(hf.config.to_dict())
    model = ParallelCausalLM(cfg, init_weights=False)
    state = hf.state_dict()
    del state["model.decoder.layers.2.fc2.bias"]
    with pytest.raises(CheckpointMismatchError, match=r"missing.*model\.decoder\.layers\.2\.fc2\.bias"):
        load_hf_llm_weights(model, state)

    state = hf.state_dict()
    state["model.decoder.layers.3.fc1.weight"] = torch.zeros(1)  # a layer the model does not have
    state["model.decoder.adapter.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected.*adapter.*layers\.3\.fc1"):
        load_hf_llm_weights(model, state)
    load_hf_llm_weights(model, state, strict=False)  # logged, not raised


def test_old_llama_checkpoints_with_rotary_buffers_load(single_process_group):
    hf = make_hf_model("llama_gqa")
    state = dict(hf.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    load_hf_llm_weights(make_ours(hf), state)


def test_pipeline_stage_loads_only_its_layers(single_process_group):
    hf = make_hf_model("opt")
    cfg = llm_config_from_hf(hf.config.to_dict())
    stage = ParallelCausalLM(cfg, pre_process=False, layer_range=(1, 3), init_weights=False)
    used = load_hf_llm_weights(stage, hf.state_dict())
    assert "model.decoder.layers.0.fc1.weight" not in used and "model.decoder.layers.2.fc1.weight" in used
    exported = export_hf_state_dict(stage)
    assert sorted(exported) == sorted(used)
    for name, tensor in exported.items():
        ref = hf.state_dict()["model.decoder.embed_tokens.weight" if name == "lm_head.weight" else name]
        assert torch.equal(tensor, ref), name


def test_pickled_bin_files_are_refused(single_process_group, tmp_path):
    hf = make_hf_model("opt")
    hf.config.save_pretrained(tmp_path)
    torch.save({**hf.state_dict(), "extra": PickledObject()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="pytorch_model.bin"):
        build_llm_from_hf(tmp_path)


def test_config_mapping_for_real_checkpoints():
    opt = llm_config_from_hf(
        dict(
            model_type="opt",
            vocab_size=50272,
            hidden_size=2560,
            num_hidden_layers=32,
            num_attention_heads=32,
            ffn_dim=10240,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            word_embed_proj_dim=2560,
            eos_token_id=2,
            pad_token_id=1,
            bos_token_id=2,
        ),
        tp=8,
    )
    assert (opt.arch, opt.tie_word_embeddings, opt.eos_token_id, opt.tp) == ("opt", True, 50118, 8)
    vicuna_hf = dict(
        model_type="llama",
        vocab_size=32001,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        pad_token_id=None,
    )
    vicuna = llm_config_from_hf(vicuna_hf)
    assert (vicuna.arch, vicuna.kv_heads, vicuna.tie_word_embeddings, vicuna.pad_token_id) == (
        "llama",
        32,
        False,
        0,
    )
    with pytest.raises(ConfigError, match="rope type 'yarn'"):
        llm_config_from_hf(dict(vicuna_hf, rope_scaling={"type": "yarn", "factor": 2.0}))
    with pytest.raises(ConfigError, match="post-LN"):
        llm_config_from_hf(dict(model_type="opt", do_layer_norm_before=False, hidden_size=1024))
    with pytest.raises(ConfigError, match="'gpt2'"):
        llm_config_from_hf(dict(model_type="gpt2"))


def test_loaded_model_matches_after_pipeline_merge(single_process_group):
    """Exports of two pipeline stages merge into the whole checkpoint."""
    hf = make_hf_model("llama_gqa")
    first = make_ours(hf, post_process=False, layer_range=(0, 1))
    last = make_ours(hf, pre_process=False, layer_range=(1, 2))
    merged = {**export_hf_state_dict(first), **export_hf_state_dict(last)}
    assert_same_state_dict(merged, hf.state_dict())
    input_ids, mask, labels = make_batch()
    with torch.no_grad():
        hidden = first(input_ids=input_ids, attention_mask=mask).hidden_states
        loss = last(hidden_states=hidden, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(
            loss, hf(input_ids=input_ids, attention_mask=mask, labels=labels).loss, **TOL
        )
