"""InstructBLIP (``model.instruction_aware``) against transformers' InstructBlip classes.

Tiny random configs on CPU in fp32. The Q-Former reading an instruction beside its queries
equals ``InstructBlipQFormerModel`` (padding in the instructions, layers with and without
cross-attention). The whole model, with a tiny LLaMA and with a tiny T5, is loaded from a
directory ``InstructBlipForConditionalGeneration.save_pretrained`` wrote (the Q-Former's
tokenizer in its ``qformer_tokenizer`` folder) through the public path,
``load_model_and_preprocess``: the same loss and logits, greedy and beam-5 tokens; the
export loads back into transformers and generates the same tokens; TP 2 equals TP 1 (loss
and greedy tokens, images and their instructions split over the TP ranks); a LAVIS
``blip2_vicuna_instruct`` / ``blip2_t5_instruct`` style checkpoint with an LLM directory
fills our model tensor for tensor; the convert command splits a directory and a job
rebuilt from the parts exports the same tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file
from test_blip2_hf import QFORMER, TEXT, VISION, _processor_inputs, images, randomize
from test_blip2_t5 import PAD, TINY_T5, _pad_after_eos, untie_and_randomize

from blip2_megatron.api import export_to_hf, load_model_and_preprocess
from blip2_megatron.build import build_model
from blip2_megatron.config import ConfigError, QFormerConfig, load_job_config
from blip2_megatron.convert import cli
from blip2_megatron.convert.hf_blip2 import (
    QFORMER_TOKENIZER_DIR,
    export_hf_blip2,
    hf_inputs_from_batch,
    read_hf_config,
)
from blip2_megatron.convert.hf_llm import save_hf_llm
from blip2_megatron.convert.vision_qformer import hf_vision_qformer_to_ours, load_into, ours_to_lavis
from blip2_megatron.data.batch import LLMBatchBuilder
from blip2_megatron.data.tokenizers import build_tokenizer
from blip2_megatron.models.llm import gather_from_tp_ranks
from blip2_megatron.models.qformer import QFormer

transformers = pytest.importorskip("transformers")

# fp32 through a ViT, a Q-Former and an LLM; without autograd our CPU products are oneDNN's,
# transformers' are MKL's (models/cpu_linear.py), so sums differ in order: ~1e-5 on logits.
TOL = dict(rtol=1e-5, atol=3e-5)
IMAGE_TOKEN = 511
NUM_QUERIES = 8
# InstructBlip's Q-Former holds word embeddings: its vocabulary counts [DEC] (the tiny tokenizer's 511).
QFORMER_IB = dict(QFORMER, vocab_size=512)
CAPTIONS = ["a red circle at the top", "two blue squares on the left"]
# Instructions of different lengths, so that the Q-Former's text is padded.
INSTRUCTIONS = ["what is in the image", "describe the shapes and their colors on the left side"]
GENERATION = {
    "greedy": dict(num_beams=1, max_new_tokens=10, min_new_tokens=0),
    "beam5": dict(num_beams=5, max_new_tokens=10, min_new_tokens=2),
}


def write_hf_instructblip(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A tiny random transformers InstructBlip saved with save_pretrained, both tokenizers beside it."""
    if arch == "t5":
        text_config = transformers.T5Config(**TINY_T5)
    else:
        text_class, text_kwargs = TEXT[arch]
        text_config = getattr(transformers, text_class)(**text_kwargs)
    config = transformers.InstructBlipConfig(
        vision_config=VISION,
        qformer_config=QFORMER_IB,
        text_config=text_config.to_dict(),
        num_query_tokens=NUM_QUERIES,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = transformers.InstructBlipForConditionalGeneration(config).eval()
    if arch == "t5":
        untie_and_randomize(model, seed)
    else:
        randomize(model, seed)
    model.save_pretrained(path)
    build_tokenizer("builtin:tiny", "llm", arch=arch).save_pretrained(path)
    build_tokenizer("builtin:tiny", "qformer").save_pretrained(path / QFORMER_TOKENIZER_DIR)
    return path


def load_reference(path: Path):
    return transformers.InstructBlipForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return write_hf_instructblip(tmp_path_factory.mktemp("instructblip_llama"), "llama")


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return write_hf_instructblip(tmp_path_factory.mktemp("instructblip_t5"), "t5")


def processor_qformer_inputs(model_dir: Path, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The instruction as InstructBlipProcessor tokenizes it: the directory's Q-Former tokenizer, padded."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir / QFORMER_TOKENIZER_DIR)
    encoded = tokenizer(prompts, padding=True, return_tensors="pt")
    return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}


def assert_same_outputs(model, hf, samples) -> None:
    """The whole model's loss, and the logits at every labelled position (decoder-only: every text one)."""
    builder = model.builder
    inputs = hf_inputs_from_batch(
        model.cfg, model.tokenizer, samples, hf.config, qformer_tokenizer=builder.qformer_tokenizer
    )
    assert (inputs["qformer_attention_mask"] == 0).any()  # the instructions are padded
    module = model.module
    with torch.no_grad():
        ref = hf(**inputs)
        batch = builder(samples)
        loss = module(batch)["loss"]
        embeds = module.input_embeddings(
            batch["image"],
            batch["input_ids"],
            batch["image_slots"],
            batch["qformer_input_ids"],
            batch["qformer_attention_mask"],
        )
        if model.cfg.llm.is_encoder_decoder:
            logits = module.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).logits
            positions = inputs["labels"] != -100
        else:
            logits = module.language_model(
                inputs_embeds=embeds, attention_mask=batch["attention_mask"]
            ).logits
            positions = batch["attention_mask"].bool() & ~batch["image_slots"]
        logits = gather_from_tp_ranks(logits, dim=-1)[..., : hf.config.text_config.vocab_size]
    assert int((inputs["labels"] != -100).sum()) > 6
    torch.testing.assert_close(loss, ref.loss, **TOL)
    torch.testing.assert_close(logits[positions], ref.logits[positions], **TOL)


def generate_both(model, reference, model_dir: Path, prompts: list[str], **kwargs):
    """(our new token ids, transformers' new token ids) for one batch, laid out as InstructBlipProcessor does.

    The LLM gets ``<image> x 8`` and the prompt with its tokenizer's template, left-padded;
    the Q-Former the prompt as BERT tokens. transformers returns the prompt (decoder-only)
    or the decoder's start token (T5) first, and pads finished T5 rows with eos.
    """
    pixels = images(len(prompts))
    ids, mask = _processor_inputs(model.tokenizer, prompts)
    ref = reference.generate(
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        **processor_qformer_inputs(model_dir, prompts),
        **kwargs,
    )
    samples = {"image": pixels, "prompt": prompts}
    ours = model.generate_tokens(samples, **kwargs)
    texts = model.generate(samples, **kwargs)
    if model.cfg.llm.is_encoder_decoder:
        assert (ref[:, 0] == PAD).all()
        ref = _pad_after_eos(ref[:, 1:])
        assert (ref[:, ours.shape[1] :] == PAD).all(), (
            f"transformers generated more:\nours {ours}\nHF   {ref}"
        )
        ref = ref[:, : ours.shape[1]]
    else:
        ref = ref[:, ids.shape[1] :]
    assert texts == [t.strip() for t in model.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    return ours, ref


def assert_generates_like(model, reference, model_dir: Path, cases=tuple(GENERATION)) -> None:
    for name in cases:
        for prompts in (INSTRUCTIONS, ["", "a photo of"]):
            ours, ref = generate_both(model, reference, model_dir, prompts, **GENERATION[name])
            assert torch.equal(ours, ref), f"{name} {prompts}:\nours {ours}\nHF   {ref}"


# ------------------------------------------------------------------------------ Q-Former
def test_qformer_with_instruction_matches_transformers():
    """Queries + padded instruction through our Q-Former (mode (c)) == InstructBlipQFormerModel."""
    hf_config = transformers.InstructBlipQFormerConfig(
        **dict(QFORMER_IB, num_hidden_layers=3, cross_attention_frequency=2, encoder_hidden_size=48)
    )
    torch.manual_seed(0)
    hf = transformers.InstructBlipQFormerModel(hf_config).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for name, param in hf.named_parameters():
            scale = 0.1 if not name.endswith("layernorm.weight") else 0.0
            param.add_(scale * torch.randn(param.shape, generator=gen))
    cfg = QFormerConfig(
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        intermediate_size=256,
        vocab_size=512,
        bos_token_id=511,
        max_position_embeddings=64,
        cross_attention_frequency=2,
        encoder_hidden_size=48,
        num_query_tokens=NUM_QUERIES,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
    )
    ours = QFormer(cfg, with_text=True).eval()
    converted, rest = hf_vision_qformer_to_ours(
        {"qformer." + k: v for k, v in hf.state_dict().items()}, prefix="", instructblip=True
    )
    assert rest == []
    report = load_into(ours, {k.removeprefix("qformer."): v for k, v in converted.items()})
    assert not report.missing and not report.unexpected

    tokenizer = build_tokenizer("builtin:tiny", "qformer")
    text = tokenizer(INSTRUCTIONS, padding=True, return_tensors="pt")
    assert (text["attention_mask"] == 0).any()
    gen = torch.Generator().manual_seed(2)
    queries = torch.randn(2, NUM_QUERIES, 64, generator=gen)
    image = torch.randn(2, 10, 48, generator=gen)
    with torch.no_grad():
        ref = hf(
            input_ids=text["input_ids"],
            attention_mask=torch.cat(
                [torch.ones(2, NUM_QUERIES, dtype=torch.long), text["attention_mask"]], 1
            ),
            query_embeds=queries,
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(2, 10, dtype=torch.long),
        ).last_hidden_state
        out = ours.encode_query_text(
            queries, text["input_ids"], text["attention_mask"], image
        ).last_hidden_state
        # the instruction changes what the queries read
        other = ours.encode_query_text(
            queries, text["input_ids"].flip(0), text["attention_mask"].flip(0), image
        )
    real = torch.cat([torch.ones(2, NUM_QUERIES, dtype=torch.bool), text["attention_mask"].bool()], 1)
    torch.testing.assert_close(out[real], ref[real], **TOL)
    assert not torch.allclose(out[:, :NUM_QUERIES], other.last_hidden_state[:, :NUM_QUERIES], atol=1e-3)


# ------------------------------------------------------------------------------ config and builder
def test_config_refuses_what_it_cannot_run():
    base = ["model.flavour=tiny_llama", "model.instruction_aware=true"]
    cfg = load_job_config(None, base).model
    assert cfg.instruction_aware and cfg.qformer.max_txt_len == 32
    with pytest.raises(ConfigError, match="does not carry the instruction"):
        load_job_config(None, [*base, "model.llm.pp=2"])
    with pytest.raises(ConfigError, match="instruction_aware"):
        load_job_config(None, [*base, "model.image_encoder=patches"])
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        load_job_config(None, [*base, "model.qformer.max_txt_len=65"])
    with pytest.raises(ConfigError, match="qformer.tokenizer"):
        LLMBatchBuilder(build_tokenizer("builtin:tiny", "llm"), cfg)


def test_builder_cuts_instructions_on_the_left(single_process_group):
    """BERT tokens of each prompt, cut on the left to qformer.max_txt_len (the end kept), padded to the longest."""
    cfg = load_job_config(
        None, ["model.flavour=tiny_llama", "model.instruction_aware=true", "model.qformer.max_txt_len=6"]
    ).model
    qformer_tokenizer = build_tokenizer("builtin:tiny", "qformer")
    builder = LLMBatchBuilder(
        build_tokenizer("builtin:tiny", "llm"), cfg, qformer_tokenizer=qformer_tokenizer
    )
    long, short = "one two three four five six seven", "red"
    batch = builder({"image": images(), "text_input": CAPTIONS, "prompt": [long, short]})
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    cls, sep = qformer_tokenizer.cls_token_id, qformer_tokenizer.sep_token_id
    words = qformer_tokenizer(long, add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == [cls, *words[-4:], sep]
    red = qformer_tokenizer("red", add_special_tokens=False)["input_ids"]
    assert ids[1].tolist() == [cls, *red, sep, 0, 0, 0]
    assert mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    generation = builder.generation_inputs([long, short])
    assert torch.equal(generation["qformer_input_ids"], ids)
    # a model that is not instruction-aware gets nothing new, and refuses an instruction
    plain = load_job_config(None, ["model.flavour=tiny_llama"]).model
    plain_batch = LLMBatchBuilder(build_tokenizer("builtin:tiny", "llm"), plain)(
        {"image": images(), "text_input": CAPTIONS}
    )
    assert "qformer_input_ids" not in plain_batch
    module = build_model(plain)
    assert not hasattr(module.query_encoder.qformer.encoder.layer[0], "intermediate")
    with pytest.raises(ValueError, match="not instruction-aware"):
        module({**plain_batch, "qformer_input_ids": ids, "qformer_attention_mask": mask})


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_loss_logits_and_generation_match_transformers(single_process_group, arch, request):
    model_dir = request.getfixturevalue(f"{arch}_dir")
    reference = load_reference(model_dir)
    model, _, _ = load_model_and_preprocess(str(model_dir))
    cfg = model.cfg
    assert cfg.instruction_aware and cfg.prompt == "" and cfg.llm.arch == arch
    assert (cfg.qformer.vocab_size, cfg.qformer.bos_token_id, cfg.qformer.max_txt_len) == (512, 511, 64)
    assert model.module.base_weight_names == {name for name, _ in model.module.named_parameters()}
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS, "prompt": INSTRUCTIONS})
    assert_generates_like(model, reference, model_dir)
    # the public path with one prompt for every image
    texts = model.generate({"image": images()}, prompt="what is this", **GENERATION["greedy"])
    ours, _ = generate_both(model, reference, model_dir, ["what is this"] * 2, **GENERATION["greedy"])
    assert texts == model.builder.decode(ours)


# ------------------------------------------------------------------------------ export
def test_export_round_trip(single_process_group, llama_dir, tmp_path):
    model, _, _ = load_model_and_preprocess(str(llama_dir))
    out = export_hf_blip2(
        model.module,
        tmp_path / "export",
        tokenizer=model.tokenizer,
        qformer_tokenizer=model.builder.qformer_tokenizer,
    )
    assert read_hf_config(out)["model_type"] == "instructblip"
    original, exported = load_file(llama_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert "qformer.embeddings.layernorm.weight" in exported and sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    reloaded = load_reference(out)
    processor = transformers.InstructBlipProcessor.from_pretrained(out)
    assert processor.num_query_tokens == NUM_QUERIES and processor.qformer_tokenizer.truncation_side == "left"
    qformer_tokenizer = transformers.AutoTokenizer.from_pretrained(out / QFORMER_TOKENIZER_DIR)
    assert (
        qformer_tokenizer(INSTRUCTIONS)["input_ids"]
        == model.builder.qformer_tokenizer(INSTRUCTIONS)["input_ids"]
    )
    assert_generates_like(model, reloaded, out, ("greedy", "beam5"))


def test_convert_commands_round_trip(single_process_group, llama_dir, tmp_path):
    """hf-to-ours (query encoder + LLM directory with the Q-Former tokenizer) -> a job -> ours-to-hf: same tensors."""
    ours_file, llm_dir = tmp_path / "qformer.safetensors", tmp_path / "llama"
    counts = cli.hf_to_ours(llama_dir, ours_file, llm_out=llm_dir)
    names = list(load_file(ours_file))
    assert counts["llm"] > 0 and "query_encoder.qformer.embeddings.word_embeddings.weight" in names
    assert (llm_dir / QFORMER_TOKENIZER_DIR / "tokenizer.json").is_file()
    overrides = [
        "model.flavour=tiny_llama",  # with the reference's depth, GQA, FFN width, RoPE base and epsilons
        "model.instruction_aware=true",
        "model.llm.num_layers=2",
        "model.llm.num_kv_heads=2",
        "model.llm.intermediate_size=128",
        "model.llm.norm_eps=1e-6",
        "model.llm.rope_theta=500.0",
        "model.vision.ln_vision_eps=1e-6",
        f"model.qformer.tokenizer={llm_dir / QFORMER_TOKENIZER_DIR}",
        f"model.init_checkpoint={ours_file}",
        f"model.llm.weights={llm_dir}",
    ]
    out = export_to_hf(tmp_path / "export", overrides=overrides)
    assert (out / QFORMER_TOKENIZER_DIR / "tokenizer.json").is_file()
    original, exported = load_file(llama_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


# ------------------------------------------------------------------------------ tensor parallelism
TP_SAMPLES_PROMPTS = ["what is in the image", "describe the shapes on the left side", "colors"]


def _loss_and_greedy(model_dir: Path) -> tuple[float, list[list[int]]]:
    from blip2_megatron.parallel import state

    model, _, _ = load_model_and_preprocess(str(model_dir))
    assert model.module.split_images == (state.tp_size() > 1)  # each TP rank encodes its own images
    pixels = images(3)  # 3 images over 2 TP ranks: the second repeats the last image and its instruction
    samples = {"image": pixels, "text_input": [*CAPTIONS, "a green star"], "prompt": TP_SAMPLES_PROMPTS}
    with torch.no_grad():
        loss = model.module(model.builder(samples))["loss"]
    tokens = model.generate_tokens({"image": pixels, "prompt": TP_SAMPLES_PROMPTS}, **GENERATION["greedy"])
    return float(loss), tokens.tolist()


def _tp2(rank: int, world_size: int, model_dir: Path):
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world_size, 1)
    return _loss_and_greedy(model_dir)


@pytest.mark.dist
@pytest.mark.slow
def test_tensor_parallel_2_equals_1(single_process_group, llama_dir):
    loss, tokens = _loss_and_greedy(llama_dir)
    per_rank = run_distributed(_tp2, 2, llama_dir)
    for tp_loss, tp_tokens in per_rank:
        assert abs(tp_loss - loss) < 1e-5 and tp_tokens == tokens


# ------------------------------------------------------------------------------ LAVIS
@pytest.mark.parametrize("flavour, projection", [("tiny_llama", "llm_proj"), ("tiny_flant5", "t5_proj")])
def test_lavis_instruct_checkpoint_with_an_llm_directory(single_process_group, tmp_path, flavour, projection):
    """LAVIS's blip2_vicuna_instruct / blip2_t5_instruct .pth (Q-Former with its text parts) + an LLM directory."""
    cfg = load_job_config(None, [f"model.flavour={flavour}", "model.instruction_aware=true"]).model
    original = build_model(cfg)
    state = original.state_dict()
    lavis, rest = ours_to_lavis(state)
    for key in rest:
        if key.startswith("language_projection."):
            lavis[f"{projection}." + key.removeprefix("language_projection.")] = state[key]
        else:
            assert key.startswith("language_model."), key
    assert {k.split(".")[0] for k in lavis} == {
        "visual_encoder",
        "ln_vision",
        "Qformer",
        "query_tokens",
        projection,
    }
    for text_part in (
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.intermediate.dense.weight",
        "encoder.layer.1.output.LayerNorm.bias",
    ):
        assert "Qformer.bert." + text_part in lavis, text_part
    torch.save(lavis, tmp_path / "instruct_blip.pth")
    save_hf_llm(original.language_model, tmp_path / "llm")

    loaded = build_model(
        dataclasses.replace(
            cfg,
            init_checkpoint=str(tmp_path / "instruct_blip.pth"),
            llm=dataclasses.replace(cfg.llm, weights=str(tmp_path / "llm")),
        )
    )
    expected = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    got = {k: v for k, v in loaded.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), key
    assert loaded.base_weight_names == {name for name, _ in loaded.named_parameters()}
