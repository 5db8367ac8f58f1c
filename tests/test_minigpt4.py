"""MiniGPT-4 as published: its two stages' token layouts, instructions drawn from a prompt file,
the per-step dataset choice of its multi-loader, and the LLaMA-2 variant without a Q-Former
(grouped ViT patch tokens) in every layout the Q-Former models run in.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from data_helpers import write_id_shards
from dist_utils import run_distributed

from blip2_megatron.config import ConfigError, build_model_config
from blip2_megatron.data import DataConfig, build_train_loader
from blip2_megatron.data.batch import (
    IGNORE_INDEX,
    LLMBatchBuilder,
    build_batch_builder,
    load_instructions,
    shipped_prompt_files,
)
from blip2_megatron.data.loader import batch_source

CAPTIONS = ["a red circle", "two small blue squares on the left"]
STAGE2 = {
    "kind": "minigpt4",
    "prompt": "<Img><ImageHere></Img> Describe this image in detail.",
    "prompt_template": "###Human: {} ###Assistant: ",
    "prompt_file": "minigpt4_alignment",
    "end_sym": "###",
    "max_txt_len": 160,
}
STAGE1 = {"kind": "minigpt4", "prompt": "", "prompt_template": "", "end_sym": "\n", "max_txt_len": 32}


def tiny_builder(**overrides) -> LLMBatchBuilder:
    return build_batch_builder(build_model_config("tiny", overrides))


def ids(builder: LLMBatchBuilder, text: str) -> list[int]:
    return builder.tokenizer(text, add_special_tokens=False)["input_ids"]


def row(batch: dict, name: str, index: int) -> list[int]:
    return batch[name][index].tolist()


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ layouts
def test_stage1_is_bos_image_caption_end_with_labels_on_caption_and_end():
    builder = tiny_builder(**STAGE1)
    batch = builder({"image": images(), "text_output": CAPTIONS})
    bos, pad, newline, slots = 2, 1, 3, 8  # the built-in tokenizer: "</s>", "<pad>", "\n"; 8 tiny queries
    assert builder.prefix == [bos] and builder.pad_id == pad and ids(builder, "\n") == [newline]
    length = batch["input_ids"].shape[1]
    assert length % 8 == 0
    for index, caption in enumerate(CAPTIONS):
        target = ids(builder, caption) + [newline]
        used = 1 + slots + len(target)
        assert row(batch, "input_ids", index) == [bos] + [pad] * slots + target + [pad] * (length - used)
        assert row(batch, "labels", index) == [IGNORE_INDEX] * (1 + slots) + target + [IGNORE_INDEX] * (
            length - used
        )
        assert row(batch, "image_slots", index) == [False] + [True] * slots + [False] * (length - 1 - slots)
        assert row(batch, "attention_mask", index) == [1] * used + [0] * (length - used)


def test_stage2_wraps_a_drawn_instruction_in_the_template_and_labels_only_the_answer():
    builder = tiny_builder(**STAGE2)
    keys = ["42/0/0/0/7", "42/0/0/0/8"]
    batch = builder({"image": images(), "text_output": CAPTIONS, "sample_key": keys})
    slots = 8
    for index, (caption, key) in enumerate(zip(CAPTIONS, keys)):
        instruction = builder.instruction_for(key)
        image_tag, rest = instruction.split("<ImageHere>")
        assert image_tag == "<Img>" and rest.startswith("</Img> ")
        before = [2] + ids(builder, "###Human: <Img>")
        after = ids(builder, rest + " ###Assistant: ")
        answer = ids(builder, caption + "###")
        expected = before + [1] * slots + after + answer
        labels = [IGNORE_INDEX] * (len(before) + slots + len(after)) + answer
        n = len(expected)
        assert row(batch, "input_ids", index)[:n] == expected
        assert row(batch, "labels", index)[:n] == labels
        assert set(row(batch, "labels", index)[n:]) <= {IGNORE_INDEX}
        assert row(batch, "image_slots", index)[:n] == [False] * len(before) + [True] * slots + [False] * (
            n - len(before) - slots
        )
        assert builder.tokenizer.decode(answer) == builder.tokenizer.decode(ids(builder, caption + "###"))


def test_instructions_are_drawn_per_sample_and_reproducibly_by_data_position():
    first, second = tiny_builder(**STAGE2), tiny_builder(**STAGE2)
    keys = [f"42/0/0/0/{index}" for index in range(32)]
    drawn = [first.instruction_for(key) for key in keys]
    assert drawn == [second.instruction_for(key) for key in keys]  # a resumed run draws the same
    assert set(drawn) <= set(load_instructions("minigpt4_alignment"))
    assert len(set(drawn)) >= 5  # several different instructions over one batch
    batch = {"image": images(4), "text_output": CAPTIONS * 2, "sample_key": keys[:4]}
    assert torch.equal(first(batch)["input_ids"], second(batch)["input_ids"])
    with pytest.raises(ValueError, match="sample_key"):
        first({"image": images(), "text_output": CAPTIONS})  # no data position: nothing to key the draw by
    fixed = first({"image": images(), "text_output": CAPTIONS, "prompt": [STAGE2["prompt"]] * 2})
    plain = tiny_builder(**dict(STAGE2, prompt_file=""))({"image": images(), "text_output": CAPTIONS})
    assert torch.equal(fixed["input_ids"], plain["input_ids"])  # explicit prompts win over the file


def test_an_instruction_that_does_not_place_the_image_gets_it_in_front():
    builder = tiny_builder(**STAGE2)
    assert (
        builder.conversation("What is this?")
        == "###Human: <Img><ImageHere></Img> What is this? ###Assistant: "
    )
    # Runs saved before instructions placed the image keep the image in their template.
    old_template = "###Human: <Img><ImageHere></Img> {} ###Assistant: "
    old_style = tiny_builder(
        **dict(STAGE2, prompt_template=old_template, prompt="Describe this image in detail.", prompt_file="")
    )
    assert old_style.conversation("What is this?") == builder.conversation("What is this?")
    assert tiny_builder(**STAGE1).conversation("a photo of") == "<ImageHere>a photo of"
    with pytest.raises(ValueError, match="2 times"):
        old_style.conversation("<Img><ImageHere></Img> twice")


def test_generation_inputs_end_with_the_assistant_turn():
    builder = tiny_builder(**STAGE2)
    inputs = builder.generation_inputs(["<Img><ImageHere></Img> Describe this image in detail."])
    tail = ids(builder, "</Img> Describe this image in detail. ###Assistant: ")
    assert inputs["input_ids"][0, -len(tail) :].tolist() == tail
    assert int(inputs["image_slots"].sum()) == 8


def test_the_answer_is_cut_to_max_txt_len_and_the_prompt_is_not():
    builder = tiny_builder(**dict(STAGE2, max_txt_len=3))
    batch = builder({"image": images(1), "text_output": [CAPTIONS[1]], "prompt": [STAGE2["prompt"]]})
    labels = [t for t in row(batch, "labels", 0) if t != IGNORE_INDEX]
    assert labels == ids(builder, CAPTIONS[1] + "###")[:3]
    assert builder.tokenizer.decode(row(batch, "input_ids", 0)).count("assistant") == 1
    short = tiny_builder(**dict(STAGE2, llm={"max_position_embeddings": 32}))
    with pytest.raises(ValueError, match="llm.max_position_embeddings=32"):
        short({"image": images(1), "text_output": [CAPTIONS[1]], "prompt": [STAGE2["prompt"]]})


# ------------------------------------------------------------------------------ prompt file
def test_the_shipped_prompt_file_loads_and_every_line_places_the_image(tmp_path):
    assert "minigpt4_alignment" in shipped_prompt_files()
    instructions = load_instructions("minigpt4_alignment")
    assert len(instructions) >= 8 and len(set(instructions)) == len(instructions)
    assert all(
        line.startswith("<Img><ImageHere></Img> ") and line.count("<ImageHere>") == 1 for line in instructions
    )
    own = tmp_path / "mine.txt"
    own.write_text("<Img><ImageHere></Img> Say what you see.\n\n<Img><ImageHere></Img> Describe it.\n")
    assert load_instructions(str(own)) == [
        "<Img><ImageHere></Img> Say what you see.",
        "<Img><ImageHere></Img> Describe it.",
    ]
    own.write_text("<Img><ImageHere></Img> Fine.\nDescribe it without the image.\n")
    with pytest.raises(ConfigError, match=r"mine.txt:2"):
        load_instructions(str(own))
    with pytest.raises(ConfigError, match="minigpt4_alignment"):
        load_instructions("no_such_prompts")


def test_config_checks_name_the_key():
    with pytest.raises(ConfigError, match="model.prompt_template"):
        build_model_config("tiny", dict(STAGE2, prompt_template="###Human: ###Assistant: "))
    with pytest.raises(ConfigError, match="2 times"):
        build_model_config("tiny", dict(STAGE2, prompt_template="<Img><ImageHere></Img> {}"))
    with pytest.raises(ConfigError, match="model.prompt_file"):
        build_model_config("tiny", {"prompt_file": "minigpt4_alignment"})  # kind "llm": BLIP-2 layouts
    with pytest.raises(ConfigError, match="model.patch_group"):
        build_model_config("tiny_minigpt4_llama2", {"patch_group": 3})
    with pytest.raises(ConfigError, match="no Q-Former"):
        build_model_config("tiny_minigpt4_llama2", {"freeze_qformer": True})
    with pytest.raises(ConfigError, match="model.image_encoder"):
        build_model_config("tiny", {"image_encoder": "resampler"})


# ------------------------------------------------------------------------------ per-step mixing
def mixed_config(tmp_path: Path, mode: str, **overrides) -> DataConfig:
    laion = write_id_shards(tmp_path / "laion", 2, 10, prefix="laion", image_size=8)
    ccsbu = write_id_shards(tmp_path / "ccsbu", 2, 10, prefix="cc", image_size=8)
    settings = dict(
        kind="wds",
        train_shards=[laion, ccsbu],
        mix_weights=[3.0, 1.0],
        mix_mode=mode,
        image_size=8,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=0,
        samples_per_epoch=800,
    )
    settings.update(overrides)
    return DataConfig(**settings)


def sources_of(batch: dict) -> set[str]:
    return {"laion" if sample.startswith("laion") else "cc" for sample in batch["image_id"]}


def test_per_step_mixing_takes_each_step_from_one_source_on_every_dp_rank(tmp_path):
    cfg = mixed_config(tmp_path, "batch")
    per_rank = [list(build_train_loader(cfg, dp_rank=rank, dp_size=2, seed=7)) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 200
    steps = []
    for step, (first, second) in enumerate(zip(*per_rank)):
        (source,) = sources_of(first) | sources_of(second)  # one source per step, all ranks
        assert source == ("laion", "cc")[batch_source(7, 0, step, [3.0, 1.0])]
        steps.append(source)
    assert abs(Counter(steps)["laion"] / len(steps) - 0.75) < 0.07
    per_sample = list(build_train_loader(mixed_config(tmp_path / "s", "sample"), 0, 2, seed=7))
    assert any(len(sources_of(batch)) == 2 for batch in per_sample)  # the default mixes within a batch


@pytest.mark.parametrize("num_workers", [0, 2])
def test_per_step_mixing_resumes_exactly(tmp_path, num_workers):
    cfg = mixed_config(tmp_path, "batch", samples_per_epoch=48, num_workers=num_workers, resampled=True)
    whole = [(b["image_id"], b["sample_key"]) for b in build_train_loader(cfg, 1, 2, seed=3)]
    assert len(whole) == 12 and len({k for _, keys in whole for k in keys}) == 24
    interrupted = build_train_loader(cfg, 1, 2, seed=3)
    for _ in zip(range(5), interrupted):
        pass
    resumed = build_train_loader(cfg, 1, 2, seed=3)
    resumed.load_state_dict(interrupted.state_dict())
    assert [(b["image_id"], b["sample_key"]) for b in resumed] == whole[5:]


def test_training_batches_draw_instructions_and_a_resumed_loader_draws_the_same(tmp_path):
    builder = tiny_builder(**STAGE2)
    cfg = mixed_config(tmp_path, "batch", samples_per_epoch=32, batch_size=4)
    whole = list(build_train_loader(cfg, 0, 1, seed=11, batch_builder=builder))
    prompts = set()  # the unlabelled text of each sequence: template + instruction
    for batch in whole:
        text = (batch["attention_mask"] == 1) & (batch["labels"] == IGNORE_INDEX) & ~batch["image_slots"]
        prompts |= {tuple(batch["input_ids"][i][text[i]].tolist()) for i in range(4)}
    assert len(prompts) >= 4
    interrupted = build_train_loader(cfg, 0, 1, seed=11, batch_builder=builder)
    for _ in zip(range(3), interrupted):
        pass
    resumed = build_train_loader(cfg, 0, 1, seed=11, batch_builder=builder)
    resumed.load_state_dict(interrupted.state_dict())
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, whole[3:], strict=True))


# ------------------------------------------------------------------------------ patch variant
def patch_config(**overrides):
    return build_model_config("tiny_minigpt4_llama2", overrides)


def test_patch_variant_groups_four_consecutive_patch_tokens_per_slot(single_process_group):
    from blip2_megatron.build import build_model

    torch.manual_seed(0)
    cfg = patch_config()
    assert cfg.num_image_slots == 16 // 4 and cfg.image_feature_size == 4 * 64
    model = build_model(cfg)
    assert not hasattr(model, "query_encoder")
    pixels = images()
    with torch.no_grad():
        tokens = model.patch_encoder.visual_encoder(pixels)  # [B, 1 + 16, 64], CLS first
        grouped = model.patch_encoder(pixels)
        embeds = model.image_embeddings(pixels)
    assert grouped.shape == (2, 4, 256) and embeds.shape == (2, 4, 64)
    for slot in range(4):
        torch.testing.assert_close(grouped[:, slot], tokens[:, 1 + 4 * slot : 5 + 4 * slot].flatten(1))
    builder = build_batch_builder(cfg)
    batch = builder({"image": pixels, "text_output": CAPTIONS})
    assert batch["image_slots"].sum(dim=1).tolist() == [4, 4]
    prefix = [2] + ids(builder, "[INST] <Img>")
    assert row(batch, "input_ids", 0)[: len(prefix) + 4] == prefix + [1] * 4
    answer = [t for t in row(batch, "labels", 0) if t != IGNORE_INDEX]
    assert answer == ids(builder, CAPTIONS[0] + "</s>") and answer[-1] == 2  # LLaMA-2's end: "</s>"
    loss = model(batch)["loss"]
    loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"language_projection.weight", "language_projection.bias"}
    assert model.language_projection.weight.grad.shape == (64, 256)
    assert torch.isfinite(loss) and model.language_projection.weight.grad.abs().sum() > 0
    from blip2_megatron.build import predictor_for

    model.eval()
    predictor = predictor_for(model, cfg, builder)
    options = dict(prompt="What is this?", num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert predictor.generate_tokens({"image": pixels}, **options).shape == (2, 4)
    assert len(predictor.generate({"image": pixels}, **options)) == 2


def test_patch_variant_parameter_counts(single_process_group):
    from blip2_megatron.models.param_count import count_parameters

    patches = count_parameters(patch_config(), pp=2)
    queries = count_parameters(build_model_config("tiny"))
    assert patches.parts["Q-Former (+queries)"].total == 0
    assert patches.parts["ViT"].total == queries.parts["ViT"].total
    assert patches.parts["projection"].total == patches.trainable == 256 * 64 + 64
    assert patches.stages[0].holds == ["ViT", "projection", "token embeddings"]


def test_patch_variant_loads_a_lavis_vit_and_a_minigpt4_projection(single_process_group, tmp_path):
    from blip2_megatron.build import build_model
    from blip2_megatron.convert.vision_qformer import PATCH_ENCODER_PREFIX, ours_to_lavis

    torch.manual_seed(0)
    source = build_model(patch_config())
    vit = {k: v for k, v in source.state_dict().items() if k.startswith(PATCH_ENCODER_PREFIX)}
    for key in [k for k in vit if k.endswith("self_attn.qkv.bias")]:
        vit[key][64:128] = 0.0  # EVA has no key bias
    lavis, rest = ours_to_lavis(vit, prefix=PATCH_ENCODER_PREFIX, vision_prefix="")
    assert not rest
    torch.save(lavis, tmp_path / "eva_vit_g.pth")
    projection = {"llama_proj.weight": torch.randn(64, 256), "llama_proj.bias": torch.randn(64)}
    torch.save({"model": projection}, tmp_path / "minigpt4_llama2.pth")
    torch.manual_seed(1)
    loaded = build_model(
        patch_config(init_checkpoint=f"{tmp_path / 'eva_vit_g.pth'},{tmp_path / 'minigpt4_llama2.pth'}")
    )
    state = loaded.state_dict()
    for key, tensor in vit.items():
        torch.testing.assert_close(state[key], tensor, msg=key)
    torch.testing.assert_close(state["language_projection.weight"], projection["llama_proj.weight"])
    assert {n for n in loaded.base_weight_names if not n.startswith("language_model.")} == {
        n for n, _ in loaded.named_parameters() if not n.startswith("language_model.")
    }


@pytest.fixture(scope="module")
def patch_weights(tmp_path_factory) -> dict[str, str]:
    """One tiny LLaMA (Hugging Face directory) and one image path (our names): every layout loads them."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from blip2_megatron.convert.hf_blip2 import hf_text_config
    from blip2_megatron.models.blip2 import PatchEncoder

    root = tmp_path_factory.mktemp("patch_variant")
    cfg = patch_config()
    torch.manual_seed(0)
    LlamaForCausalLM(hf_text_config(cfg.llm)).save_pretrained(root / "llama")
    encoder, projection = PatchEncoder(cfg), torch.nn.Linear(cfg.image_feature_size, cfg.llm.hidden_size)
    tensors = {f"patch_encoder.{k}": v for k, v in encoder.state_dict().items()}
    tensors.update({f"language_projection.{k}": v for k, v in projection.state_dict().items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, root / "image_path.safetensors")
    return {"llm.weights": str(root / "llama"), "init_checkpoint": str(root / "image_path.safetensors")}


def patch_loss(rank: int, world: int, weights: dict[str, str], tp: int, pp: int) -> dict:
    """Loss and projection gradient of one batch, the LLM split over ``tp`` ranks or ``pp`` stages.

    Pipeline stages run one after the other in this process, handing on what the pipeline
    engine would send between them.
    """
    from blip2_megatron.build import build_model, build_pipeline_stage
    from blip2_megatron.parallel import state

    cfg = patch_config(
        init_checkpoint=weights["init_checkpoint"], llm={"weights": weights["llm.weights"], "tp": tp}
    )
    state.initialize_model_parallel(tp, 1)
    try:
        batch = build_batch_builder(cfg)({"image": images(), "text_output": CAPTIONS})
        if pp == 1:
            first = build_model(cfg)
            loss = first(batch)["loss"]
        else:
            stages = [build_pipeline_stage(cfg, stage, pp) for stage in range(pp)]
            hidden = stages[0](
                (batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_slots"])
            )
            for stage in stages[1:]:
                hidden = stage(hidden)
            loss = stages[-1].loss(hidden, batch["labels"])
            first = stages[0].model
            assert not hasattr(stages[-1].model, "patch_encoder")  # the image path lives on stage 0
        loss.backward()
        return {"loss": loss.item(), "grad": first.language_projection.weight.grad.clone()}
    finally:
        if world == 1:
            state.destroy()


@pytest.fixture(scope="module")
def patch_reference(patch_weights) -> dict:
    return patch_loss(0, 1, patch_weights, tp=1, pp=1)


def test_patch_variant_pipeline_stages_give_the_loss_of_one_stage(patch_weights, patch_reference):
    result = patch_loss(0, 1, patch_weights, tp=1, pp=2)
    torch.testing.assert_close(result["loss"], patch_reference["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["grad"], patch_reference["grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.dist
@pytest.mark.slow
def test_patch_variant_tensor_parallel_loss_equals_one_rank(patch_weights, patch_reference):
    for result in run_distributed(patch_loss, 2, patch_weights, 2, 1):
        torch.testing.assert_close(result["loss"], patch_reference["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result["grad"], patch_reference["grad"], rtol=1e-4, atol=1e-6)


def test_a_tokenizer_without_pad_pads_with_unk_when_the_added_pad_is_past_the_vocabulary(tmp_path):
    """LLaMA-2 ships no pad token: the "[PAD]" added for it would index past the embedding."""
    from blip2_megatron.data.tokenizers import build_tokenizer

    tokenizer = build_tokenizer("builtin:tiny", "llm")
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    vocab = len(tokenizer)  # the added "[PAD]" gets id == vocab, one past this vocabulary
    builder = tiny_builder(**STAGE1, llm={"tokenizer": str(tmp_path), "vocab_size": vocab})
    unk = builder.tokenizer.unk_token_id
    assert builder.pad_id == unk == builder.tokenizer.pad_token_id and unk < vocab
    batch = builder({"image": images(), "text_output": CAPTIONS})
    assert int(batch["input_ids"].max()) < vocab
    assert (batch["input_ids"][batch["attention_mask"] == 0] == unk).all()


def test_the_patch_variant_is_not_exported_to_transformers_blip2():
    from blip2_megatron.convert.hf_blip2 import hf_config_from_ours

    with pytest.raises(ConfigError, match="image_encoder='patches'.*no Q-Former"):
        hf_config_from_ours(build_model_config("tiny_minigpt4_llama2"))
