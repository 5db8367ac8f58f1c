"""BLIP-2 FlanT5 against transformers' Blip2ForConditionalGeneration with a T5 text model.

Tiny random configs on CPU in fp32. The reference is a Blip2 directory written by
``save_pretrained`` (T5's head untied from ``shared`` by hand: transformers 5 builds every
T5 tied) with the built-in tiny tokenizer in T5's layout beside it; ours is loaded from it
through the public path, ``load_model_and_preprocess``. Loss and logits (labels are the
decoder's targets), greedy and beam-5 tokens (transformers returns the decoder's start
token first), export and the HF -> ours -> HF round trip with the head still untied after
``from_pretrained``, a model of our ``tiny_flant5`` flavour exported and run by
transformers, a job initialised from the directory, the convert commands, a checkpoint
holding T5's embedding copies, tensor parallelism 2, and a LAVIS ``blip2_t5`` checkpoint
with a FlanT5 directory.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed
from safetensors.torch import load_file, save_file
from test_blip2_hf import QFORMER, VISION, _processor_inputs, images, load_hf_blip2, load_reference, randomize
from test_llm_parity import randomize as randomize_weights

from blip2_megatron.api import export_to_hf, load_model_and_preprocess
from blip2_megatron.config import load_job_config
from blip2_megatron.convert import cli
from blip2_megatron.convert.hf_blip2 import (
    export_hf_blip2,
    hf_blip2_model_config,
    hf_config_from_ours,
    hf_inputs_from_batch,
    ours_config_from_hf,
    read_hf_config,
)
from blip2_megatron.data.tokenizers import build_tokenizer
from blip2_megatron.inference import Blip2Predictor
from blip2_megatron.models.llm import gather_from_tp_ranks

transformers = pytest.importorskip("transformers")

# fp32 through a ViT, a Q-Former and an LLM; without autograd our CPU products are oneDNN's,
# transformers' are MKL's (models/cpu_linear.py), so sums differ in order: ~1e-5 on logits.
TOL = dict(rtol=1e-5, atol=3e-5)
IMAGE_TOKEN = 511  # the last row of the 512-row vocabulary (unused by the tiny tokenizer)
PAD, EOS = 0, 1  # T5's ids, the tiny tokenizer's in T5's layout too
EOS_BOOST = 3.0  # with it greedy and beam captions both end early and run to the limit
# tiny_flant5's LLM sizes, with short relative distances so that the log-spaced buckets are reached.
TINY_T5 = dict(
    vocab_size=512,
    d_model=64,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_decoder_layers=2,  # equal depths: transformers' generate sizes its cache by the encoder's
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=20,
    feed_forward_proj="gated-gelu",  # transformers reads it as the tanh GELU (Salesforce's configs)
    dropout_rate=0.0,
    tie_word_embeddings=False,
    pad_token_id=PAD,
    eos_token_id=EOS,
    decoder_start_token_id=PAD,
)
# The same model in our flavour's terms (job overrides).
TINY_FLANT5_AS_REFERENCE = [
    "model.flavour=tiny_flant5",
    "model.llm.hidden_act=gelu_new",
    "model.llm.relative_attention_num_buckets=8",
    "model.llm.relative_attention_max_distance=20",
    "model.vision.ln_vision_eps=1e-6",  # transformers has one epsilon for the ViT
]
CAPTIONS = ["a red circle at the top", "two blue squares on the left"]


@torch.no_grad()
def untie_and_randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """FlanT5's head as a weight of its own, then random weights (a larger eos row: some captions end).

    T5 does not scale its attention scores by 1/sqrt(d): at the decoder-only LLMs' weight scale
    its softmaxes are so sharp that fp32 rounding shows above 1e-5, so its matrices get half of it.
    """
    language_model = model.language_model
    language_model.lm_head.weight = torch.nn.Parameter(language_model.lm_head.weight.detach().clone())
    randomize(model, seed)
    for name, param in language_model.named_parameters():
        if "norm" not in name:
            param.mul_(0.5)
    head = language_model.lm_head.weight
    head[EOS] *= EOS_BOOST
    assert not torch.equal(head, language_model.shared.weight)


def write_hf_blip2_t5(path: Path, seed: int = 0) -> Path:
    """A tiny random transformers Blip2 with a T5 text model, saved with save_pretrained."""
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=transformers.T5Config(**TINY_T5).to_dict(),
        num_query_tokens=8,
        image_text_hidden_size=32,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    untie_and_randomize(model, seed)
    model.save_pretrained(path)
    build_tokenizer("builtin:tiny", "llm", arch="t5").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return write_hf_blip2_t5(tmp_path_factory.mktemp("blip2_t5"))


@pytest.fixture(scope="module")
def reference(t5_dir):
    return load_reference(t5_dir)


def assert_untied(hf) -> None:
    language_model = hf.language_model
    assert language_model.lm_head.weight.data_ptr() != language_model.shared.weight.data_ptr()
    assert not torch.equal(language_model.lm_head.weight, language_model.shared.weight)
    assert not hf.config.text_config.scale_decoder_outputs  # T5 v1.1: the head reads unscaled states


def assert_same_outputs(model, hf, samples) -> None:
    """The whole model's loss, and the decoder's logits at every labelled position."""
    inputs = hf_inputs_from_batch(model.cfg, model.tokenizer, samples, hf.config)
    module = model.module
    with torch.no_grad():
        ref = hf(**inputs)
        batch = model.builder(samples)
        loss = module(batch)["loss"]
        embeds = module.input_embeddings(batch["image"], batch["input_ids"], batch["image_slots"])
        logits = module.language_model(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).logits
        logits = gather_from_tp_ranks(logits, dim=-1)[..., : hf.config.text_config.vocab_size]
    labelled = inputs["labels"] != -100
    assert int(labelled.sum()) > 6 and int((inputs["input_ids"] == IMAGE_TOKEN).sum()) == 8 * len(CAPTIONS)
    torch.testing.assert_close(loss, ref.loss, **TOL)
    torch.testing.assert_close(logits[labelled], ref.logits[labelled], **TOL)


GENERATION = {
    "greedy": dict(num_beams=1, max_new_tokens=10, min_new_tokens=0),
    "greedy_min_new": dict(num_beams=1, max_new_tokens=10, min_new_tokens=4),
    "beam5": dict(num_beams=5, max_new_tokens=10, min_new_tokens=2),
}
SAME, MIXED, NONE = ["a photo of"] * 2, ["a photo of", "what color is the large shape"], [""] * 2


def generate_both(model, reference, pixels, prompts: list[str], **kwargs):
    """(our new token ids, transformers' new token ids, our texts), the latter cut to our length.

    transformers' Blip2Processor layout in the encoder (``<image> x 8``, then the prompt as
    T5's tokenizer encodes it, ending in ``</s>``); transformers returns the decoder's start
    token first and pads finished rows: only padding may follow our tokens.
    """
    ids, mask = _processor_inputs(model.tokenizer, prompts)
    ref = reference.generate(
        pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False, **kwargs
    )
    assert (ref[:, 0] == PAD).all()  # the decoder's start token
    ref = _pad_after_eos(ref[:, 1:])
    same = len(set(prompts)) == 1
    samples = {"image": pixels} if same else {"image": pixels, "prompt": prompts}
    prompt = prompts[0] if same else None
    ours = model.generate_tokens(samples, prompt=prompt, **kwargs)
    texts = model.generate(samples, prompt=prompt, **kwargs)
    assert ours.shape[1] <= kwargs["max_new_tokens"]
    assert (ref[:, ours.shape[1] :] == PAD).all(), f"transformers generated more:\nours {ours}\nHF   {ref}"
    return ours, ref[:, : ours.shape[1]], texts


def _pad_after_eos(tokens: torch.Tensor) -> torch.Tensor:
    """Rows with PAD after their first EOS (transformers' Blip2 fills finished beams with EOS, ours with PAD)."""
    after_eos = (tokens == EOS).long().cumsum(dim=1) - (tokens == EOS).long() > 0
    return tokens.masked_fill(after_eos, PAD)


def assert_generates_like(
    model, reference, cases=tuple(GENERATION), prompts=(SAME, MIXED, NONE)
) -> tuple[int, int]:
    """Token-identical generation for every case and prompt set; returns how many captions ended
    early and how many ran to the limit."""
    ended = running = 0
    for name in cases:
        for prompt_set in prompts:
            ours, ref, texts = generate_both(model, reference, images(), prompt_set, **GENERATION[name])
            assert torch.equal(ours, ref), f"{name} {prompt_set}:\nours {ours}\nHF   {ref}"
            assert texts == [t.strip() for t in model.tokenizer.batch_decode(ref, skip_special_tokens=True)]
            ends = (ref == EOS).any(dim=1)
            ended, running = ended + int(ends.sum()), running + int((~ends).sum())
    return ended, running


# ------------------------------------------------------------------------------ config
def test_config_mapping_follows_the_directory(t5_dir):
    raw = read_hf_config(t5_dir)
    tokenizer = build_tokenizer(str(t5_dir), "llm")
    cfg = ours_config_from_hf(raw, tokenizer, {"llm": {"tp": 1}})
    llm = cfg.llm
    assert (cfg.kind, llm.arch, llm.family, cfg.prompt, cfg.end_sym) == ("llm", "t5", "t5", "", "")
    assert (llm.eos_token_id, llm.pad_token_id, llm.tie_word_embeddings) == (EOS, PAD, False)
    assert (llm.num_layers, llm.decoder_layers, llm.head_dim, llm.activation) == (2, 2, 16, "gelu_new")
    assert (llm.relative_attention_num_buckets, llm.relative_attention_max_distance) == (8, 20)
    back = hf_config_from_ours(cfg).to_dict()
    for section in ("vision_config", "qformer_config", "text_config"):
        for key, value in raw[section].items():
            if key in ("_name_or_path", "architectures", "transformers_version", "dtype"):
                continue
            assert back[section][key] == value, f"{section}.{key}"
    for key in ("num_query_tokens", "image_token_index", "image_text_hidden_size"):
        assert back[key] == raw[key]
    # T5 computes in the dtype the directory stores (as transformers does) unless told otherwise
    assert raw["dtype"] == "float32" and hf_blip2_model_config(t5_dir).llm.dtype == "fp32"
    assert hf_blip2_model_config(t5_dir, {"llm.dtype": "bf16"}).llm.dtype == "bf16"


# ------------------------------------------------------------------------------ parity
def test_loss_and_logits_match_transformers(single_process_group, t5_dir, reference):
    assert_untied(reference)
    model, image_processors, text_processors = load_model_and_preprocess(str(t5_dir))
    assert isinstance(model, Blip2Predictor) and not model.training
    assert model.cfg.llm.arch == "t5" and image_processors["eval"] is not None
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    # per-sample prompts of different lengths: encoder padding, prompts in the encoder only
    samples = {"image": images(), "text_input": CAPTIONS, "prompt": ["a photo of", "what is on the left"]}
    assert_same_outputs(model, reference, samples)


def test_generation_is_token_identical_to_transformers(single_process_group, t5_dir, reference):
    """The public path independent checks take: load_model_and_preprocess, then generate."""
    model, _, _ = load_model_and_preprocess(str(t5_dir))
    ended, running = assert_generates_like(model, reference)
    assert ended >= 3 and running >= 3, "captions should both end early and run to the limit"


# ------------------------------------------------------------------------------ export
def test_export_round_trip_keeps_the_head_untied(single_process_group, t5_dir, reference, tmp_path):
    model, cfg = load_hf_blip2(t5_dir)
    out = export_hf_blip2(model.module, tmp_path / "export", tokenizer=model.tokenizer)
    # HF -> ours -> HF: the same tensors under the same names, lm_head included
    original, exported = load_file(t5_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert "language_model.lm_head.weight" in exported and sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key

    reloaded = load_reference(out)
    assert_untied(reloaded)
    reloaded_state, reference_state = reloaded.state_dict(), reference.state_dict()
    assert sorted(reloaded_state) == sorted(reference_state)
    for key, tensor in reference_state.items():
        assert torch.equal(reloaded_state[key], tensor), key
    text = reloaded.config.text_config
    assert (text.model_type, text.eos_token_id, text.decoder_start_token_id) == ("t5", EOS, PAD)
    assert (reloaded.config.image_token_index, reloaded.config.num_query_tokens) == (IMAGE_TOKEN, 8)
    assert reloaded.generation_config.decoder_start_token_id == PAD
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer("a photo of")["input_ids"] == model.tokenizer("a photo of")["input_ids"]
    # the reloaded model generates our tokens (and so the original's)
    assert_generates_like(model, reloaded, ("greedy", "beam5"), (MIXED,))


def test_our_flavour_exports_to_transformers(single_process_group, tmp_path):
    """A tiny_flant5 model of ours (LAVIS's exact GELU) -> transformers: the same loss, logits and tokens."""
    from blip2_megatron.build import build_model, predictor_for
    from blip2_megatron.data.batch import build_batch_builder

    cfg = load_job_config(None, ["model.flavour=tiny_flant5", "model.vision.ln_vision_eps=1e-6"]).model
    module = build_model(cfg).eval()
    assert module.language_model.cfg.activation == "gelu"
    with torch.no_grad():
        randomize_weights(module, seed=3)  # the scale T5's own parity test uses
        module.language_model.lm_head.weight[EOS] *= EOS_BOOST
    model = predictor_for(module, cfg, build_batch_builder(cfg))
    out = export_hf_blip2(module, tmp_path / "flant5", tokenizer=model.tokenizer)
    hf = load_reference(out)
    assert_untied(hf)
    assert hf.config.text_config.dense_act_fn == "gelu"
    assert_same_outputs(model, hf, {"image": images(), "text_input": CAPTIONS})
    assert_generates_like(model, hf, ("greedy", "beam5"))


def test_checkpoint_with_t5_embedding_copies_loads_quietly(single_process_group, t5_dir, tmp_path, caplog):
    """Checkpoints saved from .bin files (Salesforce's) repeat ``shared`` under each stack: not read, not reported."""
    path = tmp_path / "with_copies"
    shutil.copytree(t5_dir, path)
    tensors = load_file(path / "model.safetensors")
    shared = tensors["language_model.shared.weight"]
    for stack in ("encoder", "decoder"):
        tensors[f"language_model.{stack}.embed_tokens.weight"] = shared.clone()
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model, _ = load_hf_blip2(path)
    assert not [r for r in caplog.records if "not used" in r.getMessage()]
    reference = load_reference(path)
    assert_untied(reference)
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})


def _tp2_load_generate_export(rank: int, world_size: int, t5_dir: Path, out: Path) -> list[list[int]]:
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world_size, 1)
    model, _, _ = load_model_and_preprocess(str(t5_dir))  # llm.tp follows the running group
    language_model = model.module.language_model
    assert model.cfg.llm.tp == world_size and language_model.lm_head.weight.shape[0] == 512 // world_size
    reference = load_reference(t5_dir)
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    ours, ref, _ = generate_both(model, reference, images(), MIXED, **GENERATION["beam5"])
    assert torch.equal(ours, ref), f"ours {ours}\nHF   {ref}"
    export_hf_blip2(model.module, out)  # collective: the TP shards are gathered, rank 0 writes
    return ours.tolist()


@pytest.mark.dist
def test_tensor_parallel_2_loads_generates_and_exports(t5_dir, tmp_path):
    out = tmp_path / "export_tp2"
    per_rank = run_distributed(_tp2_load_generate_export, 2, t5_dir, out)
    assert per_rank[0] == per_rank[1]
    original, exported = load_file(t5_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


# ------------------------------------------------------------------------------ jobs, CLI and LAVIS
def test_job_initialised_from_the_directory(single_process_group, t5_dir, reference):
    """``model.init_checkpoint=<Blip2-T5 directory>`` in a job of our flavour: the LLM comes with it."""
    overrides = dict(item.split("=", 1) for item in TINY_FLANT5_AS_REFERENCE[1:])
    model, _, _ = load_model_and_preprocess(
        "tiny_flant5", **overrides, **{"model.init_checkpoint": str(t5_dir)}
    )
    assert model.module.base_weight_names == {name for name, _ in model.module.named_parameters()}
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    assert_generates_like(model, reference, ("beam5",), (MIXED,))


def test_convert_commands_round_trip(single_process_group, t5_dir, tmp_path):
    """hf-to-ours (query-encoder file + a T5 directory) -> a job using them -> ours-to-hf: the same tensors."""
    ours_file, llm_dir = tmp_path / "qformer.safetensors", tmp_path / "flan-t5"
    counts = cli.hf_to_ours(t5_dir, ours_file, llm_out=llm_dir)
    assert counts["llm"] > 0 and all(
        n.startswith(("query_encoder.", "language_projection.")) for n in load_file(ours_file)
    )
    llm_config = read_hf_config(llm_dir)
    assert (llm_config["model_type"], llm_config["architectures"]) == ("t5", ["T5ForConditionalGeneration"])
    # a FlanT5 directory transformers loads, head untied
    t5 = transformers.T5ForConditionalGeneration.from_pretrained(llm_dir)
    assert t5.lm_head.weight.data_ptr() != t5.shared.weight.data_ptr()

    overrides = [
        *TINY_FLANT5_AS_REFERENCE,
        f"model.init_checkpoint={ours_file}",
        f"model.llm.weights={llm_dir}",
    ]
    out = export_to_hf(tmp_path / "export", overrides=overrides)
    original, exported = load_file(t5_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


def test_lavis_blip2_t5_checkpoint_with_a_flan_t5_directory(single_process_group, tmp_path):
    """LAVIS's blip2_t5 .pth (visual_encoder, ln_vision, Qformer, query_tokens, t5_proj) + save_hf_llm's T5 directory."""
    from blip2_megatron.build import build_model
    from blip2_megatron.convert.hf_llm import save_hf_llm
    from blip2_megatron.convert.vision_qformer import ours_to_lavis

    cfg = load_job_config(None, ["model.flavour=tiny_flant5"]).model
    original = build_model(cfg)
    lavis, rest = ours_to_lavis(original.state_dict())
    for key in rest:
        if key.startswith("language_projection."):
            lavis["t5_proj." + key.removeprefix("language_projection.")] = original.state_dict()[key]
        else:
            assert key.startswith("language_model."), key
    lavis_parts = {"visual_encoder", "ln_vision", "Qformer", "query_tokens", "t5_proj"}
    assert {k.split(".")[0] for k in lavis} == lavis_parts
    torch.save(lavis, tmp_path / "blip2_pretrained_flant5.pth")
    save_hf_llm(original.language_model, tmp_path / "flan-t5")

    loaded_cfg = dataclasses.replace(
        cfg,
        init_checkpoint=str(tmp_path / "blip2_pretrained_flant5.pth"),
        llm=dataclasses.replace(cfg.llm, weights=str(tmp_path / "flan-t5")),
    )
    loaded = build_model(loaded_cfg)
    expected = {k: v for k, v in original.state_dict().items() if isinstance(v, torch.Tensor)}
    state = {k: v for k, v in loaded.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), key
    # every parameter came from the files
    assert loaded.base_weight_names == {name for name, _ in loaded.named_parameters()}
