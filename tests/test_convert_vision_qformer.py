"""LAVIS / Hugging Face key maps, loading reports and safe weight-file reading."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_stage1 import build_model, make_tiny_tokenizer

from blip2_megatron.config import VisionConfig
from blip2_megatron.convert.vision_qformer import (
    detect_source_format,
    eva_vit_to_ours,
    hf_vision_qformer_to_ours,
    lavis_to_ours,
    load_into,
    ours_to_hf_vision_qformer,
    ours_to_lavis,
    summarize_keys,
    vision_qformer_to_ours,
)
from blip2_megatron.io import UnsafeCheckpointError, iter_checkpoint_files, load_state_dict_file
from blip2_megatron.models.vision import VisionEncoder

TINY_VISION = dict(
    image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256
)


class NotATensor:
    """A pickled object that weights_only loading must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def random_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict filled with random values (EVA's key bias kept at zero)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in model.state_dict().items()}
    for key, value in state.items():
        if key.endswith("self_attn.qkv.bias"):
            value[value.shape[0] // 3 : 2 * value.shape[0] // 3] = 0
    # Tied weights: one tensor under two names.
    state["lm_head.decoder.weight"] = state["query_encoder.qformer.embeddings.word_embeddings.weight"]
    return state


def assert_same_tensors(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)


def test_lavis_blip2_checkpoint_round_trip(tokenizer):
    source = build_model(tokenizer, seed=0)
    state = random_state(source)
    lavis, unconsumed = ours_to_lavis(state)
    assert unconsumed == []
    # Names as in LAVIS's blip2_pretrained.pth.
    for key in (
        "visual_encoder.cls_token",
        "visual_encoder.pos_embed",
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.1.attn.qkv.weight",
        "visual_encoder.blocks.1.attn.q_bias",
        "visual_encoder.blocks.1.attn.v_bias",
        "visual_encoder.blocks.0.mlp.fc2.bias",
        "ln_vision.weight",
        "Qformer.bert.embeddings.LayerNorm.weight",
        "Qformer.bert.embeddings.word_embeddings.weight",
        "Qformer.bert.encoder.layer.0.attention.self.query.weight",
        "Qformer.bert.encoder.layer.1.crossattention.self.key.weight",
        "Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias",
        "Qformer.cls.predictions.transform.dense.weight",
        "Qformer.cls.predictions.decoder.weight",
        "Qformer.cls.predictions.bias",
        "Qformer.cls.predictions.decoder.bias",
        "query_tokens",
        "vision_proj.weight",
        "text_proj.bias",
        "itm_head.weight",
        "temp",
    ):
        assert key in lavis, key
    assert not any("qkv.bias" in k for k in lavis)
    assert lavis["temp"].shape == ()  # LAVIS keeps a 0-dim temperature; ours has one element
    # Extra entries of a real checkpoint: a buffer LAVIS saves and stage-2 parts.
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(32)[None]
    lavis["opt_proj.weight"] = torch.zeros(3, 3)

    assert detect_source_format(lavis) == "lavis"
    converted, unconsumed = vision_qformer_to_ours(lavis)
    assert unconsumed == ["opt_proj.weight"]
    target = build_model(tokenizer, seed=1)
    report = load_into(target, converted)
    assert report.missing == [] and report.unexpected == []
    assert_same_tensors(target, state)


def test_eva_vit_g_file_keys(tokenizer):
    vision = VisionEncoder(VisionConfig(**TINY_VISION))
    state = {f"query_encoder.visual_encoder.{k}": v for k, v in random_state_vision(vision).items()}
    bare, _ = ours_to_lavis(state, vision_prefix="")
    bare = {k: v for k, v in bare.items() if not k.startswith("ln_vision")}  # eva_vit_g.pth has no ln_vision
    assert {
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.attn.q_bias",
        "blocks.1.norm2.weight",
    } <= set(bare)
    # EVA-CLIP has one block more than BLIP-2 uses, plus its own head.
    for key in [k for k in bare if k.startswith("blocks.1.")]:
        bare[key.replace("blocks.1.", "blocks.2.")] = bare[key].clone()
    bare["head.weight"] = torch.zeros(4, 64)

    converted, unconsumed = eva_vit_to_ours(bare, num_layers=2)
    assert "head.weight" in unconsumed and all(
        k.startswith("blocks.2.") for k in unconsumed if k != "head.weight"
    )
    q_bias, v_bias = bare["blocks.0.attn.q_bias"], bare["blocks.0.attn.v_bias"]
    torch.testing.assert_close(
        converted["encoder.layers.0.self_attn.qkv.bias"], torch.cat([q_bias, torch.zeros(64), v_bias])
    )
    target = VisionEncoder(VisionConfig(**TINY_VISION))
    report = load_into(target, converted)
    assert report.missing == ["post_layernorm.weight", "post_layernorm.bias"] and report.unexpected == []
    # lavis_to_ours recognises the bare file too.
    via_lavis, _ = lavis_to_ours(bare, prefix="", num_vision_layers=2)
    assert set(via_lavis) == {f"visual_encoder.{k}" for k in converted}


def random_state_vision(vision: VisionEncoder) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in vision.state_dict().items()}
    for key, value in state.items():
        if key.endswith("qkv.bias"):
            value[64:128] = 0
    return state


def test_clip_vit_l_keys_round_trip():
    cfg = VisionConfig(
        **TINY_VISION, arch="clip_vit_l", pre_layernorm=True, hidden_act="quick_gelu", layer_norm_eps=1e-5
    )
    vision = VisionEncoder(cfg)
    state = {f"query_encoder.visual_encoder.{k}": v for k, v in random_state_vision(vision).items()}
    lavis, unconsumed = ours_to_lavis(state, vision_arch="clip_vit_l")
    assert unconsumed == []
    assert lavis["visual_encoder.class_embedding"].shape == (64,)
    assert lavis["visual_encoder.positional_embedding"].shape == (17, 64)
    assert "visual_encoder.transformer.resblocks.1.attn.in_proj_bias" in lavis
    assert "visual_encoder.ln_pre.weight" in lavis and "visual_encoder.conv1.weight" in lavis
    back, unconsumed = lavis_to_ours(lavis)
    assert unconsumed == []
    target = VisionEncoder(cfg)
    report = load_into(target, {k.removeprefix("query_encoder.visual_encoder."): v for k, v in back.items()})
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(
        target.embeddings.class_embedding, state["query_encoder.visual_encoder.embeddings.class_embedding"]
    )


def test_hf_names_round_trip(tokenizer):
    transformers = pytest.importorskip("transformers")
    model = build_model(tokenizer)
    state = random_state(model)
    hf_state, unconsumed = ours_to_hf_vision_qformer(state)
    assert sorted(unconsumed) == sorted(k for k in state if k == "temp" or k.startswith("lm_head."))
    # Exactly the names of a Hugging Face Blip2ForImageTextRetrieval of the same size.
    q, v = model.cfg.qformer, model.cfg.vision
    hf_config = transformers.Blip2Config(
        vision_config=dict(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
        ),
        qformer_config=dict(
            vocab_size=q.vocab_size,
            hidden_size=q.hidden_size,
            num_hidden_layers=q.num_layers,
            num_attention_heads=q.num_heads,
            intermediate_size=q.intermediate_size,
            max_position_embeddings=q.max_position_embeddings,
            cross_attention_frequency=q.cross_attention_frequency,
            use_qformer_text_input=True,
        ),
        num_query_tokens=q.num_query_tokens,
        image_text_hidden_size=q.embed_dim,
    )
    hf_model = transformers.Blip2ForImageTextRetrieval(hf_config)
    hf_shapes = {k: tuple(t.shape) for k, t in hf_model.state_dict().items()}
    assert {k: tuple(t.shape) for k, t in hf_state.items()} == hf_shapes
    # LLM parts of a Blip2ForConditionalGeneration are left for the LLM converter.
    hf_state["language_projection.weight"] = torch.zeros(2, 2)
    assert detect_source_format(hf_state) == "hf"
    back, unconsumed = hf_vision_qformer_to_ours(hf_state)
    assert unconsumed == ["language_projection.weight"]
    assert vision_qformer_to_ours(hf_state)[0].keys() == back.keys()
    for key, value in back.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_shape_mismatch_names_the_tensor(tokenizer, caplog):
    model = build_model(tokenizer)
    state = model.state_dict()
    state["query_encoder.qformer.layernorm.weight"] = torch.ones(5)
    with pytest.raises(ValueError, match=r"query_encoder\.qformer\.layernorm\.weight.*\(5,\).*\(64,\)"):
        load_into(model, state)
    report = load_into(model, state, strict_shapes=False)
    assert report.skipped == ["query_encoder.qformer.layernorm.weight"]
    # Missing and unexpected keys are reported by name (and logged).
    del state["query_encoder.qformer.layernorm.weight"]
    state["not.in.the.model"] = torch.zeros(1)
    del state["itm_head.bias"]
    with caplog.at_level(logging.WARNING):
        report = load_into(model, state)
    assert report.unexpected == ["not.in.the.model"]
    assert sorted(report.missing) == ["itm_head.bias", "query_encoder.qformer.layernorm.weight"]
    assert "itm_head.bias" in caplog.text and "not.in.the.model" in caplog.text


def test_summarize_keys_collapses_layers():
    keys = [f"encoder.layers.{i}.mlp.fc1.weight" for i in range(39)] + ["temp"]
    assert summarize_keys(keys) == "encoder.layers.{0-38}.mlp.fc1.weight, temp"


def test_load_state_dict_file_formats(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a.weight": torch.randn(2, 3), "b": torch.arange(4)}
    save_file(tensors, tmp_path / "w.safetensors")
    torch.save(tensors, tmp_path / "w.pth")
    torch.save({"model": tensors, "epoch": 3, "config": {"lr": 1e-4}}, tmp_path / "lavis.pth")
    for name in ("w.safetensors", "w.pth", "lavis.pth"):
        loaded = load_state_dict_file(tmp_path / name)
        assert set(loaded) == set(tensors), name
        for key in tensors:
            torch.testing.assert_close(loaded[key], tensors[key])


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(2), "object": NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.pth.*arbitrary unpickling"):
        load_state_dict_file(path)


def test_iter_checkpoint_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="no weights"):
        iter_checkpoint_files(tmp_path)
    for i in (2, 1):
        torch.save({"x": torch.zeros(1)}, tmp_path / f"pytorch_model-0000{i}-of-00002.bin")
    assert [p.name for p in iter_checkpoint_files(tmp_path)] == [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]
    save_file({"x": torch.zeros(1)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"y": torch.zeros(1)}, tmp_path / "model-00002-of-00002.safetensors")
    assert [p.suffix for p in iter_checkpoint_files(tmp_path)] == [".safetensors"] * 2
    index = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00003-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00003"):
        iter_checkpoint_files(tmp_path)
