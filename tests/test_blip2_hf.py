"""transformers' Blip2ForConditionalGeneration <-> ours (tiny random models, CPU fp32).

The reference is a Blip2 directory written by ``save_pretrained`` with our built-in tiny
LLM tokenizer beside it; ours is loaded from it through ``load_model_and_preprocess`` /
``build_from_hf_blip2`` (the assembly layer). Loss and logits, greedy and beam generation
(token ids, not only text), prompts tokenized with the tokenizer's own template (with and
without a BOS), export and the HF -> ours -> HF round trip, a LLaMA-based Blip2,
checkpoint errors naming the tensor, and the convert commands.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip2_megatron.api import export_to_hf, load_model_and_preprocess
from blip2_megatron.build import build_from_hf_blip2, predictor_for
from blip2_megatron.convert import cli
from blip2_megatron.convert.hf_blip2 import (
    export_hf_blip2,
    hf_config_from_ours,
    hf_inputs_from_batch,
    ours_config_from_hf,
    read_hf_config,
)
from blip2_megatron.data.tokenizers import build_tokenizer
from blip2_megatron.inference import Blip2Predictor
from blip2_megatron.io import CheckpointMismatchError
from blip2_megatron.models.llm import gather_from_tp_ranks

transformers = pytest.importorskip("transformers")

# fp32 through a ViT, a Q-Former and an LLM; without autograd our CPU products are oneDNN's,
# transformers' are MKL's (models/cpu_linear.py), so sums differ in order: ~1e-5 on logits.
TOL = dict(rtol=1e-5, atol=3e-5)
IMAGE_TOKEN = 511  # the last row of the 512-row vocabulary (our tokenizer uses 240)
CAPTION_END = 3  # "\n" in the built-in tiny tokenizer
VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
)
QFORMER = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    cross_attention_frequency=1,
    vocab_size=511,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
SPECIAL_IDS = dict(bos_token_id=2, eos_token_id=CAPTION_END, pad_token_id=1)  # as the tiny tokenizer
TEXT = {
    "opt": (
        "OPTConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            ffn_dim=256,
            max_position_embeddings=128,
            dropout=0.0,
            **SPECIAL_IDS,
        ),
    ),
    "llama": (
        "LlamaConfig",
        dict(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=128,
            rope_theta=500.0,
            **SPECIAL_IDS,
        ),
    ),
}
CAPTIONS = ["a red circle at the top", "two blue squares on the left"]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights away from transformers' defaults, scaled so that generation depends on the image.

    With the same small scale everywhere the tied head just repeats one token; a stronger
    projection, moderate LLM weights and a slightly larger "\\n" row give image-dependent captions
    that end at different lengths.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name.lower() and name.endswith("weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif "embed_tokens" in name:
            param.copy_(0.3 * noise)
        elif name.startswith("language_projection"):
            param.copy_(noise)
        elif name.startswith("language_model"):
            param.copy_(0.2 * noise)
        else:
            param.copy_(0.1 * noise)
    model.get_input_embeddings().weight[CAPTION_END] *= 1.3


def write_hf_blip2(path: Path, arch: str = "opt", seed: int = 0) -> Path:
    """A tiny random transformers Blip2 saved with save_pretrained, tokenizer included."""
    text_class, text_kwargs = TEXT[arch]
    config = transformers.Blip2Config(
        vision_config=VISION,
        qformer_config=QFORMER,
        text_config=getattr(transformers, text_class)(**text_kwargs).to_dict(),
        num_query_tokens=8,
        image_text_hidden_size=32,
        image_token_index=IMAGE_TOKEN,
    )
    torch.manual_seed(seed)
    model = transformers.Blip2ForConditionalGeneration(config).eval()
    randomize(model, seed)
    model.save_pretrained(path)
    build_tokenizer("builtin:tiny", "llm").save_pretrained(path)
    return path


def load_hf_blip2(path: Path, **overrides):
    """(predictor, config) of ours from a transformers Blip2 directory."""
    module, cfg, builder = build_from_hf_blip2(path, **overrides)
    return predictor_for(module, cfg, builder), cfg


def load_reference(path: Path):
    return transformers.Blip2ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager"
    ).eval()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory) -> Path:
    return write_hf_blip2(tmp_path_factory.mktemp("blip2_opt"))


@pytest.fixture(scope="module")
def reference(opt_dir):
    return load_reference(opt_dir)


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def assert_same_outputs(model, hf, samples) -> None:
    """Loss of the whole model and logits at every text position (query slots and padding excluded)."""
    inputs = hf_inputs_from_batch(model.cfg, model.tokenizer, samples, hf.config)
    module = model.module
    with torch.no_grad():
        ref = hf(**inputs)
        batch = model.builder(samples)
        loss = module(batch)["loss"]
        embeds = module.input_embeddings(batch["image"], batch["input_ids"], batch["image_slots"])
        logits = module.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        logits = gather_from_tp_ranks(logits, dim=-1)  # vocab-parallel under TP > 1
    assert int((inputs["labels"] != -100).sum()) > 6  # the captions (and "\n") carry the loss
    text = batch["attention_mask"].bool() & ~batch["image_slots"]
    torch.testing.assert_close(loss, ref.loss, **TOL)
    torch.testing.assert_close(logits[text], ref.logits[text], **TOL)


# ------------------------------------------------------------------------------ config
def test_config_mapping_follows_the_directory(opt_dir):
    raw = read_hf_config(opt_dir)
    tokenizer = build_tokenizer(str(opt_dir), "llm")
    cfg = ours_config_from_hf(raw, tokenizer, {"llm": {"tp": 1}})
    assert (cfg.kind, cfg.llm.arch, cfg.prompt, cfg.end_sym) == ("llm", "opt", "a photo of", "\n")
    assert cfg.llm.eos_token_id == CAPTION_END == tokenizer.convert_tokens_to_ids("\n")
    assert (cfg.qformer.vocab_size, cfg.qformer.bos_token_id, cfg.qformer.num_query_tokens) == (512, 511, 8)
    assert cfg.vision.ln_vision_eps == cfg.vision.layer_norm_eps == raw["vision_config"]["layer_norm_eps"]
    # without a tokenizer the caption end is the config's eos
    assert ours_config_from_hf(raw).llm.eos_token_id == CAPTION_END
    back = hf_config_from_ours(cfg).to_dict()
    for section in ("vision_config", "qformer_config", "text_config"):
        for key, value in raw[section].items():
            if key in ("_name_or_path", "architectures", "transformers_version", "dtype"):
                continue
            assert back[section][key] == value, f"{section}.{key}"
    for key in ("num_query_tokens", "image_token_index", "image_text_hidden_size"):
        assert back[key] == raw[key]


# ------------------------------------------------------------------------------ parity
def test_loss_and_logits_match_transformers(single_process_group, opt_dir, reference):
    model, image_processors, text_processors = load_model_and_preprocess(str(opt_dir))
    assert isinstance(model, Blip2Predictor) and not model.training
    assert image_processors["eval"] is not None and "eval" in text_processors
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    # per-sample prompts of different lengths (right padding, prompt tokens take no loss)
    samples = {"image": images(), "text_input": CAPTIONS, "prompt": ["a photo of", "what is on the left"]}
    assert_same_outputs(model, reference, samples)


def _processor_inputs(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Blip2Processor layout: <image> x num_query, then the tokenized prompt, left-padded."""
    rows = [[IMAGE_TOKEN] * 8 + tokenizer(p)["input_ids"] for p in prompts]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


GENERATION = {
    "greedy": dict(num_beams=1, max_new_tokens=10, min_new_tokens=0),
    "greedy_min_new": dict(num_beams=1, max_new_tokens=10, min_new_tokens=4),
    "beam3": dict(num_beams=3, max_new_tokens=10, min_new_tokens=2),
}


def generate_both(model, reference, pixels, prompts: list[str] | None, **kwargs):
    """(our new token ids, transformers' new token ids, our texts) for one batch.

    ``prompts=None``: no prompt; transformers then builds ``<image> x 8 + bos`` itself.
    """
    if prompts is None:
        ref = reference.generate(pixel_values=pixels, do_sample=False, **kwargs)[:, 9:]
        samples, prompt = {"image": pixels}, ""
    else:
        ids, mask = _processor_inputs(model.tokenizer, prompts)
        ref = reference.generate(
            pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False, **kwargs
        )
        ref = ref[:, ids.shape[1] :]  # transformers returns the prompt too
        same = len(set(prompts)) == 1
        samples = {"image": pixels} if same else {"image": pixels, "prompt": prompts}
        prompt = prompts[0] if same else None
    ours = model.generate_tokens(samples, prompt=prompt, **kwargs)
    texts = model.generate(samples, prompt=prompt, **kwargs)
    return ours, ref, texts


SAME, MIXED = ["a photo of"] * 2, ["a photo of", "what color is the large shape"]


def test_generation_is_token_identical_to_transformers(single_process_group, opt_dir, reference):
    model, _, _ = load_model_and_preprocess(str(opt_dir))
    pixels = images()
    ended = running = 0
    for name, kwargs in GENERATION.items():
        for prompts in (SAME, MIXED, None):
            ours, ref, texts = generate_both(model, reference, pixels, prompts, **kwargs)
            assert torch.equal(ours, ref), f"{name} {prompts}:\nours {ours}\nHF   {ref}"
            assert texts == [t.strip() for t in model.tokenizer.batch_decode(ref, skip_special_tokens=True)]
            ends = (ref == CAPTION_END).any(dim=1)
            ended, running = ended + int(ends.sum()), running + int((~ends).sum())
    assert ended >= 3 and running >= 3, "captions should both end early and run to the limit"


def test_prompts_follow_a_tokenizer_template_without_bos(single_process_group, opt_dir, reference, tmp_path):
    """A tokenizer whose template adds no BOS (Qwen2-style): ours and transformers' Blip2 agree token for token.

    Prompts go through the tokenizer's own template in training and generation alike, as
    transformers' Blip2Processor and LAVIS tokenize them; no BOS is forced in.
    """
    tokenizer = build_tokenizer("builtin:tiny", "llm")
    tokenizer.backend_tokenizer.post_processor = None  # no template: no "</s>" before the text
    tokenizer_dir = tmp_path / "no_bos_tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    model, _ = load_hf_blip2(opt_dir, **{"llm.tokenizer": str(tokenizer_dir)})
    assert model.builder.prefix == [] and model.tokenizer("a photo of")["input_ids"][0] != 2
    batch = model.builder({"image": images(), "text_input": CAPTIONS})
    first_text = batch["input_ids"][:, 8]  # right after the 8 query slots
    assert first_text.tolist() == [model.tokenizer("a photo of")["input_ids"][0]] * 2
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    for kwargs in GENERATION.values():
        ours, ref, _ = generate_both(model, reference, images(), MIXED, **kwargs)
        assert torch.equal(ours, ref), f"ours {ours}\nHF   {ref}"


# ------------------------------------------------------------------------------ export
def test_export_round_trip_is_exact(single_process_group, opt_dir, reference, tmp_path):
    model, cfg = load_hf_blip2(opt_dir)
    out = export_hf_blip2(model.module, tmp_path / "export", tokenizer=model.tokenizer)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial directory left
    # HF -> ours -> HF: the same tensors under the same names (a tied head is not stored)
    original, exported = load_file(opt_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key

    reloaded = load_reference(out)
    reloaded_state, reference_state = reloaded.state_dict(), reference.state_dict()
    assert sorted(reloaded_state) == sorted(reference_state)
    for key, tensor in reference_state.items():
        assert torch.equal(reloaded_state[key], tensor), key
    assert reloaded.config.text_config.eos_token_id == CAPTION_END
    assert (reloaded.config.image_token_index, reloaded.config.num_query_tokens) == (IMAGE_TOKEN, 8)
    samples = {"image": images(), "text_input": CAPTIONS}
    inputs = hf_inputs_from_batch(cfg, model.tokenizer, samples, reloaded.config)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).loss, reference(**inputs).loss)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer("a photo of\n")["input_ids"] == model.tokenizer("a photo of\n")["input_ids"]

    with pytest.raises(FileExistsError, match="overwrite"):
        export_hf_blip2(model.module, out)
    export_hf_blip2(model.module, out, overwrite=True)  # replaced whole: no tokenizer this time
    assert not (out / "tokenizer.json").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _tp2_load_generate_export(rank: int, world_size: int, opt_dir: Path, out: Path) -> list[list[int]]:
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world_size, 1)
    model, cfg = load_hf_blip2(opt_dir)  # llm.tp follows the running group
    assert (
        cfg.llm.tp == world_size
        and model.module.language_model.embed_tokens.weight.shape[0] == 512 // world_size
    )
    reference = load_reference(opt_dir)
    assert_same_outputs(model, reference, {"image": images(), "text_input": CAPTIONS})
    ours, ref, _ = generate_both(model, reference, images(), MIXED, **GENERATION["beam3"])
    assert torch.equal(ours, ref), f"ours {ours}\nHF   {ref}"
    export_hf_blip2(model.module, out)  # collective: the TP shards are gathered, rank 0 writes
    return ours.tolist()


@pytest.mark.dist
def test_tensor_parallel_load_generate_and_export(opt_dir, tmp_path):
    """TP = 2 (two gloo processes): the same loss, logits and beams, and an export equal to the original."""
    from dist_utils import run_distributed

    out = tmp_path / "export_tp2"
    per_rank = run_distributed(_tp2_load_generate_export, 2, opt_dir, out)
    assert per_rank[0] == per_rank[1]
    original, exported = load_file(opt_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key


def test_llama_based_blip2_matches_transformers(single_process_group, tmp_path):
    try:
        path = write_hf_blip2(tmp_path / "blip2_llama", arch="llama")
    except (ValueError, KeyError) as err:  # pragma: no cover - depends on the transformers version
        pytest.skip(f"transformers cannot build Blip2 with a LLaMA text model: {err}")
    model, cfg = load_hf_blip2(path)
    assert (cfg.llm.arch, cfg.llm.num_kv_heads, cfg.llm.tie_word_embeddings) == ("llama", 2, False)
    assert_same_outputs(model, load_reference(path), {"image": images(), "text_input": CAPTIONS})


# ------------------------------------------------------------------------------ errors
def _broken_copy(opt_dir: Path, path: Path, edit) -> Path:
    shutil.copytree(opt_dir, path)
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", {"format": "pt"})
    return path


@pytest.mark.parametrize(
    "edit, error, named",
    [
        (lambda t: t.pop("qformer.layernorm.weight"), CheckpointMismatchError, "qformer.layernorm.weight"),
        (
            lambda t: t.pop("language_model.model.decoder.final_layer_norm.bias"),
            CheckpointMismatchError,
            "language_model.model.decoder.final_layer_norm.bias",
        ),
        (
            lambda t: t.update({"language_model.model.decoder.layers.1.fc1.weight": torch.zeros(255, 64)}),
            CheckpointMismatchError,
            "model.decoder.layers.1.fc1.weight",
        ),
        (
            lambda t: t.update({"vision_model.encoder.layers.0.mlp.fc1.weight": torch.zeros(255, 64)}),
            ValueError,
            "encoder.layers.0.mlp.fc1.weight",
        ),
    ],
    ids=["missing_qformer", "missing_llm", "shape_llm", "shape_vision"],
)
def test_bad_checkpoints_are_reported_by_tensor_name(
    single_process_group, opt_dir, tmp_path, edit, error, named
):
    path = _broken_copy(opt_dir, tmp_path / "broken", edit)
    with pytest.raises(error, match=named.replace(".", r"\.")):
        load_hf_blip2(path)


def test_directory_without_tokenizer_says_what_to_pass(single_process_group, opt_dir, tmp_path):
    path = tmp_path / "no_tokenizer"
    shutil.copytree(opt_dir, path, ignore=shutil.ignore_patterns("tokenizer*"))
    with pytest.raises(ValueError, match="llm.tokenizer"):
        load_hf_blip2(path)
    model, _ = load_hf_blip2(path, **{"llm.tokenizer": "builtin:tiny"})
    assert model.tokenizer.eos_token_id == CAPTION_END
    # load_model_and_preprocess hands its overrides on (dotted, "model." optional)
    model, _, _ = load_model_and_preprocess(
        str(path), **{"model.llm.tokenizer": "builtin:tiny", "prompt": ""}
    )
    assert model.cfg.prompt == "" and model.cfg.llm.tokenizer == "builtin:tiny"


# ------------------------------------------------------------------------------ CLI
def test_convert_commands_round_trip(single_process_group, opt_dir, tmp_path):
    """hf-to-ours (query encoder file + LLM directory) -> a job using them -> ours-to-hf: the same tensors."""
    ours_file, llm_dir = tmp_path / "qformer.safetensors", tmp_path / "opt"
    counts = cli.hf_to_ours(opt_dir, ours_file, llm_out=llm_dir)
    names = list(load_file(ours_file))
    assert counts["ours"] == len(names) and counts["llm"] > 0
    assert all(n.startswith(("query_encoder.", "language_projection.")) for n in names)
    assert read_hf_config(llm_dir)["model_type"] == "opt" and (llm_dir / "tokenizer.json").is_file()

    overrides = [
        "model.flavour=tiny",  # the tiny flavour with the reference's depth and epsilon
        "model.llm.num_layers=2",
        "model.vision.ln_vision_eps=1e-6",
        f"model.init_checkpoint={ours_file}",
        f"model.llm.weights={llm_dir}",
    ]
    out = export_to_hf(tmp_path / "export", overrides=overrides)
    original, exported = load_file(opt_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(exported[key], tensor), key
    with pytest.raises(FileExistsError):
        cli.hf_to_ours(opt_dir, ours_file)
