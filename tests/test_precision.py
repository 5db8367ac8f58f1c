"""Parameter dtypes after engine set-up, and one bf16 step on CPU.

Frozen parts are kept out of DeepSpeed's cast and keep LAVIS's layout: the frozen ViT's
Linear/Conv weights in ``vision.frozen_dtype`` with LayerNorms and embeddings in fp32, the
frozen LLM wholly in ``llm.dtype``; trained parts follow the engine's precision (bf16 here;
DeepSpeed keeps their fp32 master copy in the optimizer). On CPU fp16 weights would be
kept in fp32, so the test asks for bf16 everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    "a dot",
    "there is a large green triangle in the center of a plain picture",
    "a red circle",
    "two squares",
]


def _expected_dtype(name: str, param: torch.nn.Parameter) -> torch.dtype:
    if name.startswith("language_model."):
        return torch.bfloat16  # frozen LLM: llm.dtype, norms included (as from_pretrained(torch_dtype=...))
    if ".visual_encoder." in name:
        # frozen ViT: half Linear/Conv weights, fp32 LayerNorms, CLS and position embeddings
        is_matmul = any(
            k in name for k in ("patch_embedding", "self_attn.qkv", "self_attn.projection", "mlp.fc")
        )
        return torch.bfloat16 if is_matmul else torch.float32
    return torch.bfloat16  # trained: the engine's precision


def _tiny_engine(overrides: list[str], zero: int):
    """The default tiny job with ``overrides`` (batch 4) under ``ds_configs/zero{zero}.json`` at DP 1."""
    from blip2_megatron.config import load_job_config
    from blip2_megatron.parallel import state
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.engine import build_engine

    job = load_job_config(None, [*overrides, "data.batch_size=4", "train.max_steps=2"])
    state.initialize_model_parallel(1, 1)
    return job, build_engine(job, read_ds_config(REPO / "ds_configs" / f"zero{zero}.json"), 2, 2)


def _batch(job):
    """One batch of 4 random 32 px images with CAPTIONS (mixed lengths), from the job's batch builder."""
    from blip2_megatron.data.batch import build_batch_builder

    gen = torch.Generator().manual_seed(0)
    samples = {
        "image": torch.randn(4, 3, 32, 32, generator=gen),
        "text_input": CAPTIONS,
        "image_id": [0, 1, 2, 3],
    }
    return build_batch_builder(job.model)(samples)


def step_in_bf16(rank: int, world: int, zero: int) -> dict:
    job, engine = _tiny_engine(
        [
            "train.precision=bf16",
            "model.vision.frozen_dtype=bf16",
            "model.llm.dtype=bf16",
            "model.llm.freeze=true",
        ],
        zero,
    )
    params = dict(engine.model.named_parameters())
    wrong = {
        name: (str(p.dtype), str(_expected_dtype(name, p)))
        for name, p in params.items()
        if p.dtype != _expected_dtype(name, p)
    }
    frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    result = engine.step(iter([_batch(job)]))
    frozen_equal = all(torch.equal(params[n], before) for n, before in frozen_before.items())
    return {
        "wrong": wrong,
        "loss": float(result.losses["loss"]),
        "skipped": result.skipped,
        "frozen_equal": frozen_equal,
        "vision_linear": str(
            params[next(n for n in params if n.endswith("mlp.fc1.weight") and "visual" in n)].dtype
        ),
        "count": len(params),
    }


@pytest.mark.dist
@pytest.mark.parametrize("zero", [0, 2])
def test_frozen_parts_keep_their_dtypes_under_a_bf16_engine(zero):
    (result,) = run_distributed(step_in_bf16, 1, zero)
    assert result["count"] > 20
    assert result["wrong"] == {}, result["wrong"]
    assert result["vision_linear"] == "torch.bfloat16"
    assert not result["skipped"] and torch.isfinite(torch.tensor(result["loss"]))
    assert result["frozen_equal"]


# ------------------------------------------------------------------ host reads in the hot path
class _HostRead(AssertionError):
    pass


def _refuse_host_reads(monkeypatch):
    """Make every read of a tensor's value into Python fail (what waits for a GPU)."""

    def refuse(self, *args, **kwargs):
        raise _HostRead(f"host read of a tensor of shape {tuple(self.shape)}")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("flavour", ["tiny", "tiny_minigpt4_llama2"])
def test_training_forward_and_backward_read_nothing_from_the_device(
    flavour, single_process_group, monkeypatch
):
    """The loss of a right-padded batch (mixed caption lengths) is computed without one host read."""
    from blip2_megatron.build import build_model
    from blip2_megatron.config import build_model_config
    from blip2_megatron.data.batch import build_batch_builder

    cfg = build_model_config(flavour)
    model = build_model(cfg).train()
    builder = build_batch_builder(cfg)
    size = cfg.vision.image_size
    samples = {
        "image": torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0)),
        "text_input": CAPTIONS,
        "image_id": [0, 1, 2, 3],
        "sample_key": ["a/0", "a/1", "a/2", "a/3"],
    }
    batch = builder(samples)
    assert batch["attention_mask"].sum(1).unique().numel() > 1  # rows of different lengths
    expected = model(batch)["loss"].detach().clone()
    _refuse_host_reads(monkeypatch)
    loss = model(batch)["loss"]
    loss.backward()
    monkeypatch.undo()
    assert torch.equal(loss.detach(), expected)


@pytest.mark.parametrize("flavour", ["tiny", "tiny_internlm2"])
def test_causal_path_for_right_padding_gives_the_masked_loss(flavour, single_process_group):
    """is_causal on right-padded rows gives exactly the loss of the dense padding mask."""
    from blip2_megatron.config import build_model_config
    from blip2_megatron.models.llm import ParallelCausalLM

    cfg = build_model_config(flavour).llm
    torch.manual_seed(0)
    lm = ParallelCausalLM(cfg).eval()
    ids = torch.randint(4, cfg.vocab_size, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        dense = lm(input_ids=ids, attention_mask=mask, labels=labels).loss
        causal = lm(input_ids=ids, attention_mask=mask, labels=labels, right_padded=True).loss
    torch.testing.assert_close(causal, dense, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ inference precision
def test_inference_dtype_follows_training_off_cpu_and_stays_fp32_on_cpu_unless_asked():
    from blip2_megatron.accelerator import inference_dtype

    assert inference_dtype("auto", "bf16") is None  # this machine is a CPU
    assert inference_dtype("fp32", "bf16") is None
    assert inference_dtype("bf16", "fp32") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        inference_dtype("fp16", "fp32")  # no half-precision matmuls on CPU


def test_generation_computes_in_the_asked_dtype_and_counts_tokens_per_second(single_process_group):
    from blip2_megatron.api import load_model_and_preprocess

    model, _, _ = load_model_and_preprocess("tiny", precision="bf16")
    assert model.compute_dtype == torch.bfloat16
    # Our own linears follow autocast. (megatron-core's TP linears declare their
    # autograd functions for CUDA autocast and stay fp32 under CPU autocast: a frozen LLM
    # computes in its weights' llm.dtype there.)
    seen = set()
    linear = model.module.language_projection  # the Q-Former output's projection into the LLM
    handle = linear.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    image = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    tokens = model.generate_tokens({"image": image}, num_beams=2, max_new_tokens=6, min_new_tokens=6)
    handle.remove()
    assert seen == {torch.bfloat16}, seen
    assert model.generated_tokens == int((tokens != model.builder.pad_id).sum()) == 12
    assert model.tokens_per_second() > 0


# ------------------------------------------------------------------ a trained ViT in half precision
def step_with_trained_vit(rank: int, world: int, precision: str, zero: int) -> dict:
    """One step of the tiny model with its ViT trained (the caption job's setting) under ``precision``."""
    job, engine = _tiny_engine(
        [
            f"train.precision={precision}",
            "model.vision.freeze=false",
            "model.llm.freeze=true",
            "model.llm.dtype=auto",
        ],
        zero,
    )
    encoder = engine.model.image_encoder.visual_encoder
    streams: list[str] = []  # the residual stream leaving each ViT block
    for layer in encoder.encoder.layers:
        layer.register_forward_hook(lambda _m, _i, out: streams.append(str(out.dtype)))
    matmuls: list[str] = []  # what one of its Linear layers computes in
    encoder.encoder.layers[0].mlp.fc1.register_forward_hook(
        lambda _m, _i, out: matmuls.append(str(out.dtype))
    )
    result = engine.step(iter([_batch(job)]))
    params = dict(engine.model.named_parameters())
    return {
        "vision": sorted({str(p.dtype) for n, p in params.items() if ".visual_encoder." in n}),
        "qformer": sorted({str(p.dtype) for n, p in params.items() if ".qformer." in f".{n}"}),
        "llm": sorted({str(p.dtype) for n, p in params.items() if n.startswith("language_model.")}),
        "llm_dtype": job.model.llm.dtype,
        "streams": sorted(set(streams)),
        "matmuls": sorted(set(matmuls)),
        "autocast": bool(engine.ds.torch_autocast_enabled()),
        "skipped": result.skipped,
        "loss": float(result.losses["loss"]),
    }


@pytest.mark.dist
def test_a_trained_vit_keeps_fp32_weights_and_residual_stream_under_bf16():
    """As the caption job says: ViT parameters and residual stream fp32, matmuls bf16 (autocast, as LAVIS's AMP)."""
    (result,) = run_distributed(step_with_trained_vit, 1, "bf16", 2)
    assert result["autocast"]
    assert result["vision"] == ["torch.float32"]  # LayerNorms, CLS, position embedding, Linear masters
    assert result["streams"] == ["torch.float32"]
    assert result["matmuls"] == ["torch.bfloat16"]
    assert result["qformer"] == ["torch.float32"]
    assert result["llm_dtype"] == "bf16" and result["llm"] == ["torch.bfloat16"]  # frozen: follows precision
    assert not result["skipped"] and torch.isfinite(torch.tensor(result["loss"]))


def test_llm_dtype_follows_train_precision_unless_set():
    from blip2_megatron.config import ConfigError, load_job_config

    assert load_job_config("caption_coco_opt2.7b").model.llm.dtype == "bf16"  # train.precision: bf16
    job = load_job_config("caption_coco_opt2.7b", ["train.precision=fp16"])
    assert job.model.llm.dtype == "fp16"
    assert load_job_config("caption_coco_opt2.7b", ["model.llm.dtype=fp32"]).model.llm.dtype == "fp32"
    with pytest.raises(ConfigError, match="without loss scaling"):
        load_job_config("caption_coco_opt2.7b", ["model.llm.dtype=fp16"])  # under bf16


@pytest.mark.parametrize(
    ("job", "precision", "fp16_engine", "autocast"),
    [
        ("stage2_opt2.7b", "fp16", True, None),  # frozen ViT: DeepSpeed's fp16 engine, dynamic loss scale
        ("caption_coco_opt2.7b", "fp16", False, "float16"),  # trained ViT: autocast, ZeRO's gradient scaler
        ("caption_coco_opt2.7b", "bf16", False, "bfloat16"),
        ("stage2_opt2.7b", "bf16", False, None),
    ],
)
def test_half_precision_engines_scale_the_loss_in_fp16(job, precision, fp16_engine, autocast):
    """A frozen fp16 LLM passes gradients back only with loss scaling: the fp16 engine's or ZeRO's scaler."""
    from blip2_megatron.config import load_job_config
    from blip2_megatron.training.ds_config import fill_ds_config, read_ds_config

    config = load_job_config(job, [f"train.precision={precision}", "data.batch_size=4"])
    assert config.model.llm.dtype == precision
    filled = fill_ds_config(config, read_ds_config(REPO / "ds_configs" / "zero2.json"), dp_size=1)
    assert filled["fp16"]["enabled"] is fp16_engine
    assert filled.get("torch_autocast", {}).get("dtype") == autocast
    if fp16_engine:
        assert filled["fp16"].get("loss_scale", 0) == 0  # 0: DeepSpeed's dynamic loss scale
    if autocast:
        assert filled["bf16"]["enabled"] is False  # parameters stay fp32
