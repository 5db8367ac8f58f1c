"""Quantized frozen LLMs (``llm.quantize``: int8 / nf4 through bitsandbytes) on CPU, tiny random models.

The reference is transformers' Blip2ForConditionalGeneration loaded from the same
directory with bitsandbytes and the same settings (LLM.int8 with threshold 6.0; NF4 with
double quantization), the vision tower, Q-Former, projection and head kept unquantized as
ours are. Greedy tokens must be identical at TP 1; TP 2 (row-parallel shards quantized
per shard) stays within the tolerance documented in models/quantize.py. Also: LLM weight
memory against bf16, the meta-device memory figures against a measured model, directories
transformers saved quantized, the chat CLI, training through a 4-bit LLM and the config
refusals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_blip2_hf import CAPTIONS, MIXED, SAME, _processor_inputs, images, write_hf_blip2
from test_llm_parity import make_batch, make_hf_model

from blip2_megatron.api import load_model_and_preprocess
from blip2_megatron.build import build_llm_from_hf, build_model
from blip2_megatron.config import ConfigError, build_model_config
from blip2_megatron.convert.hf_blip2 import export_hf_blip2
from blip2_megatron.models.llm import gather_from_tp_ranks
from blip2_megatron.models.param_count import llm_weight_bytes
from blip2_megatron.models.quantize import (
    QuantizedParallelLinear,
    mode_from_quantization_config,
    quantize_llm,
    weight_bytes,
)

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")  # transformers' bitsandbytes loading needs it

MODES = ("int8", "nf4")
# What transformers must leave unquantized to match ours (its default keeps only lm_head).
SKIP_MODULES = ["vision_model", "qformer", "language_projection", "lm_head"]
GREEDY = dict(num_beams=1, max_new_tokens=10, min_new_tokens=0)
# TP 2 against TP 1 on the tiny OPT (logits of std 2.6), as models/quantize.py documents it:
# largest logit difference (measured 0.26 int8, 1.37 nf4) and the share of positions whose
# next-token argmax agrees (measured 97% int8, 94% nf4).
TP2_TOLERANCE = {"int8": {"max": 0.5, "argmax_agreement": 0.9}, "nf4": {"max": 2.0, "argmax_agreement": 0.9}}
REPO = Path(__file__).resolve().parents[1]


def bnb_config(mode: str, skip_modules: list[str] = SKIP_MODULES):
    if mode == "int8":
        return transformers.BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=skip_modules
        )
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip_modules,
    )


def load_quantized_reference(path: Path, mode: str | None = None):
    kwargs = {"quantization_config": bnb_config(mode)} if mode else {}
    return transformers.Blip2ForConditionalGeneration.from_pretrained(
        path, attn_implementation="eager", **kwargs
    ).eval()


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory) -> Path:
    return write_hf_blip2(tmp_path_factory.mktemp("blip2_opt"))


def greedy_both(model, reference, prompts: list[str] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(our new tokens, transformers' new tokens), greedy, for the test images."""
    pixels = images()
    if prompts is None:
        ref = reference.generate(pixel_values=pixels, do_sample=False, **GREEDY)[:, 9:]
        return model.generate_tokens({"image": pixels}, prompt="", **GREEDY), ref
    ids, mask = _processor_inputs(model.tokenizer, prompts)
    ref = reference.generate(
        pixel_values=pixels, input_ids=ids, attention_mask=mask, do_sample=False, **GREEDY
    )
    samples = {"image": pixels, "prompt": prompts}
    return model.generate_tokens(samples, prompt=None, **GREEDY), ref[:, ids.shape[1] :]


def assert_quantized_like_transformers(model, mode: str) -> None:
    """Every decoder linear quantized, the embedding, head and projection not."""
    language_model = model.module.language_model
    expected = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    layers = [m for m in language_model.modules() if isinstance(m, QuantizedParallelLinear)]
    assert len(layers) == 6 * model.cfg.llm.num_layers
    assert all(isinstance(layer.quantized, expected) for layer in layers)
    assert not isinstance(language_model.lm_head, QuantizedParallelLinear)
    for module in (language_model.embed_tokens, language_model.lm_head, model.module.language_projection):
        assert all(p.dtype == torch.float32 for p in module.parameters())


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("mode", MODES)
def test_greedy_tokens_equal_transformers_with_bitsandbytes(single_process_group, opt_dir, tmp_path, mode):
    model, _, _ = load_model_and_preprocess(str(opt_dir), quantize=mode)
    assert model.cfg.llm.quantize == mode
    assert_quantized_like_transformers(model, mode)
    reference = load_quantized_reference(opt_dir, mode)
    for prompts in (SAME, MIXED, None):
        ours, ref = greedy_both(model, reference, prompts)
        assert torch.equal(ours, ref), f"{mode} {prompts}:\nours {ours}\nHF   {ref}"
    # the quantization changes the logits (else the comparison would not test it)
    dense_logits, _ = _logits_and_tokens(load_model_and_preprocess(str(opt_dir))[0])
    assert (_logits_and_tokens(model)[0] - dense_logits).abs().max() > 1e-3
    # Export writes dense Hugging Face tensors: a quantized LLM is refused, nothing written.
    with pytest.raises(ValueError, match=f"cannot export an LLM quantized to {mode}"):
        export_hf_blip2(model.module, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("mode", MODES)
def test_directory_saved_quantized_by_transformers_loads(single_process_group, opt_dir, tmp_path, mode):
    reference = load_quantized_reference(opt_dir, mode)
    saved = tmp_path / f"blip2_{mode}"
    reference.save_pretrained(saved)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (saved / name).write_bytes((opt_dir / name).read_bytes())
    assert (
        json.loads((saved / "config.json").read_text())["quantization_config"]["quant_method"]
        == "bitsandbytes"
    )
    model, _, _ = load_model_and_preprocess(str(saved))
    assert model.cfg.llm.quantize == mode
    assert_quantized_like_transformers(model, mode)
    reloaded = transformers.Blip2ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager")
    for prompts in (SAME, MIXED):
        ours, ref = greedy_both(model, reloaded.eval(), prompts)
        assert torch.equal(ours, ref), f"{mode} {prompts}:\nours {ours}\nHF   {ref}"
    if mode == "int8":  # re-quantizing the dequantized weights gives back the stored int8 rows and scales
        stored = reference.language_model.model.decoder.layers[0].fc1
        ours_fc1 = model.module.language_model.layers[0].mlp.fc1.quantized
        assert torch.equal(ours_fc1.weight.data, stored.weight.data)


@pytest.mark.parametrize("mode", MODES)
def test_llm_directory_saved_quantized_by_transformers_loads_as_llm_weights(
    single_process_group, tmp_path, mode
):
    """A stand-alone LLM transformers saved quantized (an 8-bit Vicuna, say), as ``llm.weights`` reads it."""
    dense_dir, saved = tmp_path / "opt", tmp_path / f"opt_{mode}"
    make_hf_model("opt").save_pretrained(dense_dir)
    transformers.OPTForCausalLM.from_pretrained(
        dense_dir, quantization_config=bnb_config(mode, ["lm_head"]), attn_implementation="eager"
    ).save_pretrained(saved)
    reference = transformers.OPTForCausalLM.from_pretrained(saved, attn_implementation="eager").eval()

    ours = build_llm_from_hf(saved)
    assert ours.cfg.quantize == mode  # read from the directory's quantization_config
    quantize_llm(ours.eval(), mode)
    from_dense = build_llm_from_hf(dense_dir, quantize=mode)  # the same LLM quantized by us
    quantize_llm(from_dense.eval(), mode)
    input_ids, mask, _ = make_batch(padding="left")
    with torch.no_grad():
        logits = ours(input_ids=input_ids, attention_mask=mask).logits
        dense_logits = from_dense(input_ids=input_ids, attention_mask=mask).logits
        ref = reference(input_ids=input_ids, attention_mask=mask).logits
    real = mask.bool()
    if mode == "int8":  # the stored int8 rows come back bit for bit, so the model is the same
        stored = reference.model.decoder.layers[0].fc1.weight.data
        assert torch.equal(ours.layers[0].mlp.fc1.quantized.weight.data, stored)
        assert torch.equal(logits, dense_logits)
    else:  # NF4 codes come back exactly; the double-quantized scales may move by their last 8-bit step
        torch.testing.assert_close(logits, dense_logits, rtol=0, atol=1e-2)
    # transformers' model on the saved directory picks the same next tokens
    assert torch.equal(logits[real].argmax(-1), ref[real].argmax(-1))

    with pytest.raises(ConfigError, match=f"holds bitsandbytes {mode} weights.*llm.quantize={mode}"):
        build_llm_from_hf(saved, quantize="none")


def test_quantization_configs_other_than_bitsandbytes_int8_and_nf4_are_refused():
    assert mode_from_quantization_config({"quant_method": "bitsandbytes", "load_in_8bit": True}) == "int8"
    for config, named in (
        ({"quant_method": "gptq", "bits": 4}, "gptq"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "fp4"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True, "llm_int8_threshold": 4.0}, "4.0"),
    ):
        with pytest.raises(ConfigError, match=named):
            mode_from_quantization_config(config)


# ------------------------------------------------------------------------------ TP 2
def _tp_logits_and_tokens(rank: int, world_size: int, opt_dir: Path, mode: str):
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world_size, 1)
    model, _, _ = load_model_and_preprocess(str(opt_dir), quantize=mode)
    return _logits_and_tokens(model)


def _logits_and_tokens(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-vocabulary logits at every position for a long prompt, and greedy captions."""
    samples = {
        "image": images(),
        "text_input": CAPTIONS,
        "prompt": ["a photo of two red squares on the left"] * 2,
    }
    module = model.module
    with torch.no_grad():
        batch = model.builder(samples)
        embeds = module.input_embeddings(batch["image"], batch["input_ids"], batch["image_slots"])
        logits = module.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        logits = gather_from_tp_ranks(logits, dim=-1)
    tokens = model.generate_tokens({"image": images()}, prompt="a photo of", **GREEDY)
    return logits, tokens


@pytest.mark.dist
@pytest.mark.parametrize("mode", MODES)
def test_tensor_parallel_stays_within_the_documented_tolerance(opt_dir, mode):
    """TP 2 quantizes row-parallel shards on their own (models/quantize.py): close to TP 1, not equal."""
    from dist_utils import run_distributed

    from blip2_megatron.parallel import state

    state.initialize_model_parallel(1, 1)
    try:
        tp1_logits, tp1_tokens = _logits_and_tokens(load_model_and_preprocess(str(opt_dir), quantize=mode)[0])
        dense_logits, _ = _logits_and_tokens(load_model_and_preprocess(str(opt_dir))[0])
    finally:
        state.destroy()
    (logits, tokens), other = run_distributed(_tp_logits_and_tokens, 2, opt_dir, mode)
    assert torch.equal(logits, other[0]) and torch.equal(tokens, other[1])  # both ranks agree
    real = torch.isfinite(tp1_logits)  # padded vocabulary columns are -inf
    tp_difference = (logits - tp1_logits)[real].abs()
    quantization_difference = (tp1_logits - dense_logits)[real].abs()
    tolerance = TP2_TOLERANCE[mode]
    assert 0 < tp_difference.max() <= tolerance["max"], f"{mode}: largest difference {tp_difference.max()}"
    assert tp_difference.mean() < quantization_difference.mean()  # closer to TP 1 than TP 1 is to bf16
    agree = (logits.argmax(-1) == tp1_logits.argmax(-1)).float().mean()
    assert agree >= tolerance["argmax_agreement"], f"{mode}: next-token argmax agrees at {agree:.0%}"
    if mode == "int8":
        assert torch.equal(tokens, tp1_tokens)


# ------------------------------------------------------------------------------ memory
def _llm_model(mode: str, dtype: str, **llm):
    overrides = {"llm": {"dtype": dtype, "quantize": mode, **llm}}
    return build_model(build_model_config("tiny", overrides)).language_model


def test_llm_weight_memory_int8_and_nf4_against_bf16(single_process_group):
    """A tiny OPT whose embedding is as small a share of the LLM as in the shipped flavours (~3%)."""
    shape = dict(hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4, vocab_size=512)
    bf16 = weight_bytes(_llm_model("none", "bf16", **shape))
    ratios = {mode: weight_bytes(_llm_model(mode, "bf16", **shape)) / bf16 for mode in MODES}
    assert ratios["int8"] <= 0.55 and ratios["nf4"] <= 0.30, ratios


@pytest.mark.parametrize("mode", ("none", *MODES))
def test_meta_device_memory_figures_equal_a_measured_model(single_process_group, mode):
    """OPT-125M's width (768 x 3072, 50272 tokens) with 2 layers: computed bytes == measured bytes."""
    cfg = build_model_config(
        "tiny",
        {
            "llm": dict(
                hidden_size=768,
                intermediate_size=3072,
                num_layers=2,
                num_heads=12,
                vocab_size=50272,
                max_position_embeddings=2048,
                dtype="bf16",
                quantize=mode,
            )
        },
    )
    measured = weight_bytes(build_model(cfg).language_model)
    assert llm_weight_bytes(cfg) == measured


# ------------------------------------------------------------------------------ chat CLI
def test_chat_cli_answers_with_an_int8_llm(opt_dir, sample):
    from journeys import env

    image = next(Path(sample.image_root).rglob("*.jpg"))
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "chat.py"), "--model", str(opt_dir), "--quantize", "int8",
         "--image", str(image), "--max-new-tokens", "6"],
        input="what is this\n", env=env(), capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = proc.stdout.splitlines()
    assert len(answers) == 1 and answers[0].strip(), proc.stdout
    assert "LLM quantized to int8" in proc.stderr


# ------------------------------------------------------------------------------ training
def test_qformer_trains_through_a_4bit_llm(single_process_group):
    """Stage 2 with an NF4 LLM: the gradient reaches the projection and Q-Former; a few steps lower the loss."""
    torch.manual_seed(0)
    model = build_model(build_model_config("tiny", {"llm": {"quantize": "nf4", "freeze": True}}))
    assert not any(p.requires_grad for p in model.language_model.parameters())
    from blip2_megatron.data.batch import build_batch_builder

    builder = build_batch_builder(model.cfg)
    batch = builder({"image": images(4), "text_input": ["a red circle at the top", "two blue squares"] * 2})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        grad = model.language_projection.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1, losses


def test_training_run_through_a_quantized_llm_saves_no_packed_weights(tmp_path, sample):
    """Through launch/train.py: the LLM comes from a run, trains nothing, and no checkpoint holds
    its packed weights; a quantized LLM with random weights (nothing to read them back from) is refused."""
    from journeys import launch

    from blip2_megatron.convert.run_checkpoint import RunWeights, find_checkpoint

    data = [f"data.sample_root={sample.root}", "train.max_steps=3", "eval.enabled=false"]
    first, second = tmp_path / "dense", tmp_path / "nf4"
    launch("train.py", "--config", "tiny_stage2", *data, f"train.output_dir={first}")
    quantized = ["model.llm.freeze=true", "model.llm.quantize=nf4", "train.save_interval=3"]
    launch(
        "train.py",
        "--config",
        "tiny_stage2",
        *data,
        *quantized,
        f"model.init_checkpoint={first}",
        f"train.output_dir={second}",
    )
    saved = RunWeights(find_checkpoint(second) / "weights").keys()
    assert saved and not [name for name in saved if name.startswith("language_model.")]
    refused = launch(
        "train.py",
        "--config",
        "tiny_stage2",
        *data,
        *quantized,
        f"train.output_dir={tmp_path / 'random'}",
        check=False,
    )
    assert refused.returncode != 0 and "does not come from files" in refused.stderr


# ------------------------------------------------------------------------------ config
def test_quantize_needs_a_frozen_llm():
    with pytest.raises(ConfigError, match="needs a frozen LLM"):
        build_model_config("tiny", {"llm": {"quantize": "int8", "freeze": False}})
    with pytest.raises(ConfigError, match="llm.quantize"):
        build_model_config("tiny", {"llm": {"quantize": "int4"}})
