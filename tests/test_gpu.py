"""On a CUDA device: precision, attention kernels, generation and build memory (tiny models).

Every test here needs a GPU and DeepSpeed's accelerator set to it; elsewhere (CPU, CI) the
module is collected and skipped with the reason. ``launch/gpu/validate.sh`` runs it with
``DS_ACCELERATOR=cuda`` and fails if anything is skipped.

* a training step of the real engine in bf16 and in fp16 (ZeRO 0 and 2; fp16 steps until
  the loss scale lets one through) on a batch of mixed caption lengths: a finite loss,
  frozen weights untouched, every parameter in its designed dtype on the device, and for
  fp16 DeepSpeed's loss scale above its minimum;
* scaled_dot_product_attention held to the flash kernel for the ViT and Q-Former at
  BLIP-2's head sizes and for the whole model's training loss, in bf16;
* greedy and beam search on the device token-identical to the same model on CPU in fp32
  (TF32 off), with and without an attention mask; in bf16, that they run and what they
  return is shaped right;
* device memory while a BLIP-2 model with a bf16 LLM is built from a Hugging Face OPT
  directory: within 1.3x the bytes the model holds there;
* ours exported to transformers' Blip2 (the export ``launch/convert.py ours-to-hf`` writes)
  at BLIP-2 OPT-2.7B's widths with two layers per part, both sides from the same weights in
  bf16: losses within rtol 2e-2 and identical greedy tokens.

Each check is a function taking the device and dtype, so that the same code runs on CPU
in bf16 wherever that is meaningful.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch

from blip2_megatron import accelerator
from blip2_megatron.config import build_model_config, load_job_config
from blip2_megatron.data.batch import build_batch_builder


def _why_no_device() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device; torch sees none"
    if accelerator.is_cpu():
        return (
            f"DeepSpeed's accelerator is the CPU (DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')!r}); "
            "run with DS_ACCELERATOR=cuda, as launch/gpu/validate.sh does"
        )
    return None


NO_DEVICE = _why_no_device()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(NO_DEVICE is not None, reason=NO_DEVICE or "")]

REPO = Path(__file__).resolve().parents[1]
DTYPE_BY_NAME = accelerator.DTYPE_BY_NAME
CAPTIONS = [
    "a dot",
    "there is a large green triangle in the center of a plain picture",
    "a red circle",
    "two squares",
]
# The frozen ViT's matmul weights (Linear / Conv), the only ViT parameters kept in frozen_dtype.
VIT_MATMULS = ("patch_embedding", "self_attn.qkv", "self_attn.projection", "mlp.fc")


def mixed_length_batch(cfg, image_size: int) -> dict:
    """A training batch from the real batch builder, its captions of different lengths (right padding)."""
    builder = build_batch_builder(cfg)
    samples = {
        "image": torch.randn(
            len(CAPTIONS), 3, image_size, image_size, generator=torch.Generator().manual_seed(0)
        ),
        "text_input": CAPTIONS,
        "image_id": list(range(len(CAPTIONS))),
    }
    batch = builder(samples)
    assert batch["attention_mask"].sum(1).unique().numel() > 1, "the rows should differ in length"
    return batch


def cast_trained(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Trained parameters in ``dtype``, frozen ones as they are (what the engine does in bf16 / fp16)."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return model


# ------------------------------------------------------------------ 1. a step of the real engine
def expected_dtype(name: str, precision: str, frozen: str) -> torch.dtype:
    """The designed dtype of parameter ``name`` under a ``precision`` engine with a frozen ViT in ``frozen``."""
    if name.startswith("language_model."):
        return DTYPE_BY_NAME[precision]  # frozen LLM: llm.dtype ("auto": the engine's precision) throughout
    if ".visual_encoder." in name:
        # LAVIS's frozen ViT: half Linear/Conv weights, fp32 LayerNorms, CLS and position embeddings
        return DTYPE_BY_NAME[frozen] if any(k in name for k in VIT_MATMULS) else torch.float32
    return DTYPE_BY_NAME[precision]  # trained: the engine's precision


def loss_scale(optimizer) -> tuple[float, float]:
    """(current, minimum) dynamic loss scale of DeepSpeed 0.19's fp16 optimizers.

    ZeRO 1 / 2 keep a ``DynamicLossScaler`` in ``loss_scaler``; without ZeRO the fp16
    optimizers (fused and unfused) keep the scale in ``loss_scale_config``.
    """
    scaler = getattr(optimizer, "loss_scaler", None)
    if scaler is not None and hasattr(scaler, "min_scale"):
        return float(scaler.cur_scale), float(scaler.min_scale)
    config = optimizer.loss_scale_config
    return float(config.cur_scale), float(config.min_loss_scale)


def engine_steps(precision: str, frozen: str, zero: int, max_steps: int) -> dict[str, float]:
    """Train the tiny stage-2 model (frozen ViT and LLM) through ``build_engine`` until a step is applied.

    Megatron-core's groups must be running. fp16 may need more than one step: DeepSpeed's
    loss scale starts at 2**16 and skips steps whose gradients overflow while it backs off.
    Checks the parameters' dtypes and device, a finite loss, frozen weights unchanged and a
    trained weight moved; for fp16, the loss scale above its minimum. Returns the figures.
    """
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.engine import build_engine

    job = load_job_config(
        None,
        [
            f"train.precision={precision}",
            f"model.vision.frozen_dtype={frozen}",
            "model.llm.dtype=auto",
            "model.llm.freeze=true",
            "data.batch_size=4",
            f"train.max_steps={max_steps}",
        ],
    )
    engine = build_engine(job, read_ds_config(REPO / "ds_configs" / f"zero{zero}.json"), max_steps, max_steps)
    device = accelerator.current_device()
    params = dict(engine.model.named_parameters())
    wrong = {
        name: (str(p.dtype), str(expected_dtype(name, precision, frozen)))
        for name, p in params.items()
        if p.dtype != expected_dtype(name, precision, frozen)
    }
    assert not wrong, f"parameters not in their designed dtype (found, expected): {wrong}"
    elsewhere = sorted(name for name, p in params.items() if p.device != device)
    assert not elsewhere, f"parameters not on {device}: {elsewhere}"
    frozen_before = {name: p.detach().clone() for name, p in params.items() if not p.requires_grad}
    assert any(".visual_encoder." in n for n in frozen_before) and any(
        n.startswith("language_model.") for n in frozen_before
    )
    trained_before = params["language_projection.weight"].detach().clone()

    batch = mixed_length_batch(job.model, job.model.vision.image_size)
    steps = 0
    while steps < max_steps:
        steps += 1
        result = engine.step(iter([batch]))
        if not result.skipped:
            break
    assert not result.skipped, f"all {max_steps} {precision} steps were skipped (non-finite gradients)"
    loss = float(result.losses["loss"])
    assert math.isfinite(loss), loss
    changed = sorted(name for name, before in frozen_before.items() if not torch.equal(params[name], before))
    assert not changed, f"frozen parameters changed by the step: {changed}"
    assert not torch.equal(params["language_projection.weight"], trained_before), "the step was not applied"
    figures = {"loss": loss, "steps": float(steps)}
    if precision == "fp16":
        scale, minimum = loss_scale(engine.ds.optimizer)
        assert scale > minimum, f"fp16 loss scale {scale} fell to its minimum {minimum}"
        figures.update(loss_scale=scale, min_loss_scale=minimum)
    return figures


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_engine_step_keeps_designed_dtypes_and_frozen_weights(single_process_group, precision, zero):
    """The stage-2 layout as shipped (frozen ViT in fp16, LLM in the engine's precision) under bf16 or fp16."""
    figures = engine_steps(precision, "fp16", zero, max_steps=1 if precision == "bf16" else 24)
    print(f"{precision} ZeRO {zero}: {figures}")


# ------------------------------------------------------------------ 2. flash attention
def vit_and_qformer_under_flash(device: torch.device, dtype: torch.dtype, dropout: float = 0.1) -> None:
    """ViT and Q-Former forward and backward with SDPA allowed only its flash kernel.

    BLIP-2's widths (EVA ViT-g: head size 88; Q-Former: 64, with its attention
    ``dropout``), two layers each; the ViT frozen with ``dtype`` matmul weights, the
    Q-Former trained in ``dtype``. A call the flash kernel cannot take (a mask, an
    unsupported dtype or head size; on CPU, any dropout) raises.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blip2_megatron.models.query_encoder import QueryEncoder
    from blip2_megatron.models.vision import freeze_vision

    cfg = build_model_config(
        "tiny",
        {
            "vision": dict(
                image_size=224, patch_size=14, hidden_size=1408, num_heads=16, intermediate_size=6144
            ),
            "qformer": dict(
                hidden_size=768,
                num_heads=12,
                intermediate_size=3072,
                cross_attention_frequency=2,
                num_query_tokens=32,
                hidden_dropout_prob=dropout,
                attention_dropout_prob=dropout,
            ),
        },
    )
    assert cfg.vision.num_layers == 2 and cfg.qformer.num_layers == 2
    torch.manual_seed(0)
    encoder = QueryEncoder(cfg, with_text=False)
    freeze_vision(encoder.visual_encoder, dtype)
    encoder = cast_trained(encoder, dtype).to(device).train()
    image = torch.randn(2, 3, 224, 224, device=device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        features = encoder.encode_image(image)
        queries = encoder.query_output(features).last_hidden_state
        queries.float().square().mean().backward()
    assert features.shape == (2, cfg.vision.num_positions, 1408) and torch.isfinite(features).all()
    assert queries.shape == (2, 32, 768) and queries.dtype == dtype and torch.isfinite(queries).all()
    grads = [p.grad for p in encoder.qformer.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def blip2_loss_under_flash(device: torch.device, dtype_name: str) -> float:
    """The tiny model's training loss (mixed caption lengths) and its backward, flash kernel only.

    Frozen ViT and LLM in ``dtype_name``, trained parts cast to it: the ViT, the Q-Former
    and the LLM's causal path for right-padded rows must all take the flash kernel.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from blip2_megatron.build import build_model
    from blip2_megatron.training.engine import to_device

    cfg = build_model_config(
        "tiny", {"vision": {"frozen_dtype": dtype_name}, "llm": {"dtype": dtype_name, "freeze": True}}
    )
    torch.manual_seed(0)
    model = cast_trained(build_model(cfg, device=device), DTYPE_BY_NAME[dtype_name]).train()
    batch = to_device(mixed_length_batch(cfg, cfg.vision.image_size), device)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        loss = model(batch)["loss"]
        loss.backward()
    assert torch.isfinite(loss), loss
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return float(loss.detach())


def test_vit_and_qformer_run_on_the_flash_kernel_in_bf16(single_process_group):
    vit_and_qformer_under_flash(accelerator.current_device(), torch.bfloat16)


def test_training_loss_runs_on_the_flash_kernel_in_bf16(single_process_group):
    loss = blip2_loss_under_flash(accelerator.current_device(), "bf16")
    print(f"bf16 loss under flash attention: {loss:.4f}")


# ------------------------------------------------------------------ 3. generation
@contextlib.contextmanager
def full_fp32_matmuls():
    """fp32 matmuls without TF32 (``init_distributed`` allows it), restored afterwards."""
    precision, cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn


def prompt_embeds(hidden: int, batch: int = 2, seq: int = 7, left_pad: int = 3):
    """Prompt embeddings and a mask whose rows after the first are left-padded (as BLIP-2 prompts)."""
    embeds = 0.5 * torch.randn(batch, seq, hidden, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1:, :left_pad] = 0
    return embeds, mask


SEARCHES = {
    "greedy": dict(num_beams=1, max_new_tokens=12),
    "beam3": dict(num_beams=3, max_new_tokens=10, num_return_sequences=2, min_new_tokens=2),
}


def generations(model, embeds, mask, eos: int) -> dict[str, torch.Tensor]:
    """Every search of :data:`SEARCHES`, with ``mask`` and without one, as tensors on CPU."""
    from blip2_megatron.models.generation import generate

    out = {}
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    for name, kwargs in SEARCHES.items():
        for masked in (True, False):
            tokens = generate(
                model,
                embeds.to(device, dtype),
                mask.to(device) if masked else None,
                eos_token_id=eos,
                pad_token_id=1,
                **kwargs,
            )
            assert tokens.device == device and tokens.dtype == torch.long
            out[f"{name}, {'masked' if masked else 'no mask'}"] = tokens.cpu()
    return out


def check_shapes(outputs: dict[str, torch.Tensor], batch: int, vocab: int) -> None:
    for case, tokens in outputs.items():
        kwargs = SEARCHES[case.split(",")[0]]
        rows = batch * kwargs.get("num_return_sequences", 1)
        assert tokens.shape[0] == rows and 1 <= tokens.shape[1] <= kwargs["max_new_tokens"], (
            case,
            tokens.shape,
        )
        assert int(tokens.min()) >= 0 and int(tokens.max()) < vocab, case


def device_generation_against_cpu(device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Greedy and beam search of one tiny OPT on ``device`` in ``dtype`` and on CPU in fp32.

    In fp32 the tokens must be identical; in other dtypes only the shapes are checked.
    The end-of-text id is a token the model produces early, so hypotheses end at
    different lengths. Returns the device's tokens.
    """
    from test_llm_parity import HIDDEN, VOCAB, make_hf_model, make_ours

    from blip2_megatron.models.generation import generate

    hf = make_hf_model("opt")
    on_cpu = make_ours(hf)
    on_device = make_ours(hf).to(device, dtype)
    embeds, mask = prompt_embeds(HIDDEN)
    free = generate(on_cpu, embeds, mask, max_new_tokens=4, eos_token_id=[], pad_token_id=1)
    eos = int(free[0, 2])
    reference = generations(on_cpu, embeds, mask, eos)
    with full_fp32_matmuls():
        ours = generations(on_device, embeds, mask, eos)
    check_shapes(ours, embeds.shape[0], VOCAB)
    if dtype == torch.float32:
        for case, tokens in reference.items():
            assert torch.equal(ours[case], tokens), f"{case}:\n{device}: {ours[case]}\ncpu: {tokens}"
        assert any(bool((t == eos).any()) for t in reference.values()), "no hypothesis ended"
    return ours


def blip2_generation_runs(device: torch.device, dtype_name: str) -> dict[str, torch.Tensor]:
    """``Blip2ForLLM.generate`` (image, left-padded prompts) with frozen ViT and LLM in ``dtype_name``."""
    from blip2_megatron.build import build_model

    cfg = build_model_config(
        "tiny", {"vision": {"frozen_dtype": dtype_name}, "llm": {"dtype": dtype_name, "freeze": True}}
    )
    torch.manual_seed(0)
    model = build_model(cfg, device=device).eval()
    builder = build_batch_builder(cfg)
    inputs = {k: v.to(device) for k, v in builder.generation_inputs(["a photo of", "a"]).items()}
    assert (inputs["attention_mask"] == 0).any(), "the prompts should be left-padded"
    image = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    out = {}
    for name, kwargs in SEARCHES.items():
        tokens = model.generate(image, **inputs, **kwargs)
        assert tokens.device == device and tokens.dtype == torch.long
        out[f"{name}, masked"] = tokens.cpu()
    check_shapes(out, 2, cfg.llm.vocab_size)
    return out


def test_generation_on_the_device_equals_cpu_in_fp32(single_process_group):
    device_generation_against_cpu(accelerator.current_device(), torch.float32)


def test_generation_runs_in_bf16(single_process_group):
    device = accelerator.current_device()
    device_generation_against_cpu(device, torch.bfloat16)
    blip2_generation_runs(device, "bf16")


# ------------------------------------------------------------------ 4. build memory
# An OPT at a few hundred MB: large enough that the LLM dominates what the model holds.
OPT_WIDTHS = dict(
    vocab_size=16384,
    hidden_size=1024,
    ffn_dim=4096,
    num_attention_heads=16,
    max_position_embeddings=512,
    word_embed_proj_dim=1024,
)
OPT_LAYERS = 6


def write_random_opt(path: Path) -> int:
    """A transformers OPT directory with random bf16 weights (one safetensors file); returns its bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.OPTConfig(num_hidden_layers=OPT_LAYERS, dtype="bfloat16", **OPT_WIDTHS)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in transformers.OPTForCausalLM(config).state_dict().items()}
    shapes.pop("lm_head.weight")  # tied to the token embedding, as save_pretrained writes it
    path.mkdir(parents=True)
    config.save_pretrained(path)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        name: torch.empty(shape, dtype=torch.bfloat16).normal_(std=0.02, generator=generator)
        for name, shape in shapes.items()
    }
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sum(t.nbytes for t in tensors.values())


def opt_blip2_config(weights: Path):
    """The tiny flavour's ViT and Q-Former with a frozen bf16 LLM read from ``weights``."""
    llm = dict(
        OPT_WIDTHS,
        intermediate_size=OPT_WIDTHS["ffn_dim"],
        num_heads=OPT_WIDTHS["num_attention_heads"],
        num_layers=OPT_LAYERS,
        weights=str(weights),
        dtype="bf16",
        freeze=True,
    )
    for key in ("ffn_dim", "num_attention_heads", "word_embed_proj_dim"):
        llm.pop(key)
    return build_model_config("tiny", {"llm": llm})


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of all parameters and buffers, bytes of the LLM's parameters) as the model holds them."""
    tensors = [*model.parameters(), *model.buffers()]
    llm = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    return sum(t.numel() * t.element_size() for t in tensors), llm


def test_build_from_hf_opt_in_bf16_peaks_near_the_model_size(single_process_group, tmp_path):
    """No fp32 copy and no random initialisation of the LLM on the device while it is built."""
    from blip2_megatron.build import build_model

    device = accelerator.current_device()
    file_bytes = write_random_opt(tmp_path / "opt")
    cfg = opt_blip2_config(tmp_path / "opt")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    model = build_model(cfg, device=device)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    held, llm = held_bytes(model)
    dtypes = sorted({str(p.dtype) for p in model.language_model.parameters()})
    figures = dict(
        file_mib=file_bytes / 2**20,
        held_mib=held / 2**20,
        llm_bf16_mib=llm / 2**20,
        peak_mib=peak / 2**20,
        ratio=peak / held,
    )
    print("build on the device: " + json.dumps({k: round(v, 3) for k, v in figures.items()}))
    assert dtypes == ["torch.bfloat16"], dtypes
    assert all(p.device == device for p in model.parameters())
    assert llm > 0.9 * held, "the LLM should dominate what the model holds"
    assert peak <= 1.3 * held, figures


# ------------------------------------------------------------------ 5. parity with transformers
# BLIP-2 OPT-2.7B's widths (ViT-g, Q-Former, OPT-2.7B) with two layers per part: every matmul,
# attention and norm at its real size, small enough to build and export in seconds.
REAL_WIDTH_FEW_LAYERS = (
    "blip2_opt2.7b",
    {
        "vision": {"num_layers": 2},
        "qformer": {"num_layers": 2, "tokenizer": "builtin:tiny"},
        "llm": {"num_layers": 2, "weights": "", "tokenizer": "builtin:tiny"},
    },
)
TINY = ("tiny", {})
PARITY_RTOL = {"fp32": 1e-4, "bf16": 2e-2}
PARITY_CAPTIONS = ["a red circle at the top", "two blue squares on the left"]


def exported_parity(
    device: torch.device, dtype_name: str, size: tuple[str, dict], out_dir: Path, max_new_tokens: int = 8
) -> dict:
    """Ours and transformers' Blip2 from the same weights: the training loss and greedy tokens.

    Our model of ``size`` (flavour, overrides) with its random initial weights is exported
    with ``export_hf_blip2`` (what ``launch/convert.py ours-to-hf`` writes) into ``out_dir``
    and loaded by ``Blip2ForConditionalGeneration.from_pretrained``; both then run wholly in
    ``dtype_name`` on ``device``. The loss of a caption batch must agree within
    :data:`PARITY_RTOL` and greedy decoding without a prompt must give the same tokens.
    Megatron-core's groups must be running (TP = PP = 1). Returns the figures.
    """
    import transformers

    from blip2_megatron.build import build_model, predictor_for
    from blip2_megatron.convert.hf_blip2 import export_hf_blip2, hf_inputs_from_batch
    from blip2_megatron.training.engine import to_device

    flavour, overrides = size
    full_precision = {"vision": {"frozen_dtype": "fp32"}, "llm": {"dtype": "fp32"}}
    merged = {
        part: {**overrides.get(part, {}), **full_precision.get(part, {})}
        for part in ("vision", "qformer", "llm")
    }
    cfg = build_model_config(flavour, merged)
    dtype = DTYPE_BY_NAME[dtype_name]
    torch.manual_seed(0)
    ours = build_model(cfg, device="cpu").eval()
    builder = build_batch_builder(cfg)
    exported = export_hf_blip2(ours, out_dir, tokenizer=builder.tokenizer)
    theirs = transformers.Blip2ForConditionalGeneration.from_pretrained(exported, dtype=dtype)
    theirs = theirs.to(device).eval()
    assert {p.dtype for p in theirs.parameters()} == {dtype}, "transformers' side not wholly in the dtype"
    ours = ours.to(device, dtype)

    size_px = cfg.vision.image_size
    pixels = torch.randn(2, 3, size_px, size_px, generator=torch.Generator().manual_seed(1))
    samples = {"image": pixels, "text_input": PARITY_CAPTIONS}
    with torch.no_grad(), full_fp32_matmuls():
        batch = to_device(builder(samples), device)
        batch["image"] = batch["image"].to(dtype)
        our_loss = float(ours(batch)["loss"].float())
        inputs = to_device(hf_inputs_from_batch(cfg, builder.tokenizer, samples, theirs.config), device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        their_loss = float(theirs(**inputs).loss.float())
        greedy = dict(num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0)
        our_tokens = predictor_for(ours, cfg, builder).generate_tokens({"image": pixels}, prompt="", **greedy)
        # transformers lays out <image> x num_query_tokens + BOS itself and returns them too.
        their_tokens = theirs.generate(pixel_values=pixels.to(device, dtype), do_sample=False, **greedy)
        their_tokens = their_tokens[:, cfg.qformer.num_query_tokens + 1 :]
    our_tokens, their_tokens = our_tokens.cpu(), their_tokens.cpu()
    figures = {
        "size": flavour,
        "dtype": dtype_name,
        "device": str(device),
        "loss_ours": our_loss,
        "loss_transformers": their_loss,
        "loss_rel_diff": abs(our_loss - their_loss) / abs(their_loss),
        "greedy_tokens_identical": bool(torch.equal(our_tokens, their_tokens)),
        "greedy_tokens": our_tokens.tolist(),
    }
    assert math.isfinite(our_loss) and math.isfinite(their_loss), figures
    assert figures["loss_rel_diff"] <= PARITY_RTOL[dtype_name], figures
    assert figures["greedy_tokens_identical"], (
        f"ours {our_tokens.tolist()}\ntransformers {their_tokens.tolist()}"
    )
    return figures


def test_exported_model_matches_transformers_at_real_width_in_bf16(single_process_group, tmp_path):
    figures = exported_parity(accelerator.current_device(), "bf16", REAL_WIDTH_FEW_LAYERS, tmp_path / "hf")
    print("parity with transformers: " + json.dumps(figures))
