"""Attention on Ascend goes through torch_npu's fused kernel, heads padded where the kernel needs it.

No NPU here: the fake NPU accelerator of test_accelerator_npu answers the device questions,
and a stand-in ``torch_npu`` module (in ``sys.modules``) provides ``npu_fusion_attention``
written from its documented formula in plain torch: softmax(scale * q.k^T, masked where
``atten_mask`` is True, outside the ``pre_tockens`` / ``next_tockens`` band) @ v, with the
kernel's argument names and 7-tuple result. It records every call, so the tests see the layout,
head count, scale and head size the model hands the kernel, and compare the result with
torch's SDPA on CPU in fp32.
"""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from test_accelerator_npu import FakeNpuAccelerator

from blip2_megatron import accelerator
from blip2_megatron.config import QFormerConfig, VisionConfig
from blip2_megatron.models.llm import build_attention_mask
from blip2_megatron.models.qformer import QFormer
from blip2_megatron.models.vision import VisionEncoder

NO_LIMIT = 2147483647  # the kernel's default pre_tockens / next_tockens


class StandInFusionAttention:
    """``torch_npu.npu_fusion_attention`` in plain torch (math), recording each call."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(
        self,
        query,
        key,
        value,
        head_num,
        input_layout,
        pse=None,
        padding_mask=None,
        atten_mask=None,
        scale=1.0,
        keep_prob=1.0,
        pre_tockens=NO_LIMIT,
        next_tockens=NO_LIMIT,
        inner_precise=0,
        prefix=None,
        sparse_mode=0,
        gen_mask_parallel=True,
        sync=False,
    ):
        self.calls.append(
            dict(
                input_layout=input_layout,
                head_num=head_num,
                scale=scale,
                keep_prob=keep_prob,
                head_dim=query.shape[-1],
                kv_heads=key.shape[1],
                mask_shape=None if atten_mask is None else tuple(atten_mask.shape),
                next_tockens=next_tockens,
                contiguous=all(t.is_contiguous() for t in (query, key, value)),
            )
        )
        assert input_layout == "BNSD" and query.shape[1] == head_num
        groups = head_num // key.shape[1]
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
        scores = scale * query @ key.transpose(-1, -2)
        q_pos = torch.arange(query.shape[-2])[:, None]
        k_pos = torch.arange(key.shape[-2])[None, :]
        allowed = (k_pos >= q_pos - pre_tockens) & (k_pos <= q_pos + next_tockens)
        if atten_mask is not None:
            assert atten_mask.dtype == torch.bool and atten_mask.dim() in (2, 4)
            allowed = allowed & ~atten_mask
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        if keep_prob < 1.0:
            probs = F.dropout(probs, 1.0 - keep_prob)
        empty = query.new_empty(0)
        return probs @ value, empty, empty, empty, 0, 0, 0


@pytest.fixture(autouse=True)
def fresh_attention_choice(monkeypatch):
    """Each test decides the kernel afresh and starts with no fallback logged."""
    monkeypatch.setattr(accelerator, "_MATH_ATTENTION_WARNED", set())
    accelerator._npu_fusion_attention_kernel.cache_clear()
    yield
    accelerator._npu_fusion_attention_kernel.cache_clear()


def install_torch_npu(monkeypatch, with_kernel: bool = True) -> StandInFusionAttention:
    """Put a stand-in ``torch_npu`` into ``sys.modules``; returns its (recording) kernel."""
    kernel = StandInFusionAttention()
    module = types.ModuleType("torch_npu")
    if with_kernel:
        module.npu_fusion_attention = kernel
    monkeypatch.setitem(sys.modules, "torch_npu", module)
    return kernel


def install_fake_npu(monkeypatch, device_name: str = "Ascend910B3") -> None:
    """The accelerator answers "npu", and torch_npu reports ``device_name``."""
    fake = FakeNpuAccelerator()
    monkeypatch.setattr(accelerator, "get_accelerator", lambda: fake)
    npu = types.SimpleNamespace(get_device_name=lambda: device_name)
    monkeypatch.setattr(torch, "npu", npu, raising=False)


def tiny_vit(num_heads: int, head_dim: int) -> VisionEncoder:
    torch.manual_seed(0)
    cfg = VisionConfig(
        image_size=42,
        patch_size=14,
        hidden_size=num_heads * head_dim,
        num_layers=2,
        num_heads=num_heads,
        intermediate_size=64,
        frozen_dtype="fp32",
    )
    return VisionEncoder(cfg).eval()


def vit_output_and_grad(model: VisionEncoder, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    out = model(pixels)
    # A fixed random projection: the squared sum of LayerNorm outputs is nearly constant.
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    return out.detach(), model.encoder.layers[0].self_attn.qkv.weight.grad.clone()


@pytest.mark.parametrize("head_dim, kernel_head_dim", [(88, 96), (64, 64)], ids=["eva-88-padded", "64"])
def test_vit_attention_goes_through_the_fused_kernel(monkeypatch, head_dim, kernel_head_dim):
    """EVA's head size 88 reaches the kernel padded to 96 with the scale of 88; results equal SDPA."""
    model = tiny_vit(num_heads=2, head_dim=head_dim)
    pixels = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    expected_out, expected_grad = vit_output_and_grad(model, pixels)  # CPU: plain SDPA

    install_fake_npu(monkeypatch)
    kernel = install_torch_npu(monkeypatch)
    out, grad = vit_output_and_grad(model, pixels)

    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5)  # grads up to ~13
    assert len(kernel.calls) == 2  # one per layer
    for call in kernel.calls:
        assert call["input_layout"] == "BNSD" and call["head_num"] == 2
        assert call["head_dim"] == kernel_head_dim
        assert call["scale"] == pytest.approx(head_dim**-0.5, rel=1e-12)
        assert call["keep_prob"] == 1.0 and call["mask_shape"] is None and call["contiguous"]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_cpu_and_cuda_use_plain_sdpa_and_never_the_kernel(monkeypatch, device):
    kernel = install_torch_npu(monkeypatch)  # even with torch_npu importable
    if device == "cuda":
        monkeypatch.setattr(
            accelerator, "get_accelerator", lambda: types.SimpleNamespace(device_name=lambda: "cuda")
        )
    for head_dim in (88, 80, 64):
        assert accelerator.attention_function(head_dim) is F.scaled_dot_product_attention
    if device == "cpu":
        tiny_vit(num_heads=2, head_dim=88)(torch.randn(1, 3, 42, 42))
    assert kernel.calls == []


@pytest.mark.parametrize(
    "with_kernel, device_name, reason",
    [
        (False, "Ascend910B3", "no npu_fusion_attention"),
        (True, "Ascend910A", "not on ASCEND910A"),
    ],
    ids=["torch_npu-without-kernel", "910A"],
)
def test_math_path_fallback_is_logged_once(monkeypatch, caplog, with_kernel, device_name, reason):
    install_fake_npu(monkeypatch, device_name)
    kernel = install_torch_npu(monkeypatch, with_kernel=with_kernel)
    model = tiny_vit(num_heads=2, head_dim=88)
    pixels = torch.randn(1, 3, 42, 42)
    with caplog.at_level(logging.WARNING, logger=accelerator.__name__):
        expected = F.scaled_dot_product_attention
        assert accelerator.attention_function(88) is expected
        model(pixels)  # two layers, each asks again
        model(pixels)
        # A head size SDPA's fused kernels take falls back without a warning.
        assert accelerator.attention_function(64) is expected
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "math path" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert "head size 88" in message and "npu" in message and device_name in message and reason in message
    assert kernel.calls == []


def sdpa_and_npu(monkeypatch, head_dim, *args, **kwargs):
    """SDPA's result on CPU, then the NPU attention's result and the kernel's call record."""
    expected = F.scaled_dot_product_attention(*args, **kwargs)
    install_fake_npu(monkeypatch)
    kernel = install_torch_npu(monkeypatch)
    got = accelerator.attention_function(head_dim)(*args, **kwargs)
    return expected, got, kernel.calls


def qkv(batch, heads, kv_heads, q_len, kv_len, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, heads, q_len, head_dim, generator=gen),
        torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen),
        torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen),
    )


def test_llm_causal_gqa_and_prescaled_query_match_sdpa(monkeypatch):
    """OPT-2.7B's call (head size 80, q scaled first so scale=1) with GQA heads: causal band, no padding."""
    q, k, v = qkv(2, 4, 2, 6, 6, 80)
    expected, got, calls = sdpa_and_npu(monkeypatch, 80, q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (call,) = calls
    assert call["head_dim"] == 80 and call["head_num"] == 4 and call["kv_heads"] == 2
    assert call["scale"] == 1.0 and call["mask_shape"] == (6, 6) and call["next_tockens"] == 0


def test_llm_padding_mask_with_cache_matches_sdpa(monkeypatch):
    """Left padding with cached positions: SDPA's boolean mask (True = attend) is inverted for the kernel."""
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    mask, is_causal = build_attention_mask(attention_mask, query_len=3, past_length=4)
    assert mask is not None and not is_causal
    q, k, v = qkv(2, 2, 2, 3, 7, 88)
    expected, got, calls = sdpa_and_npu(monkeypatch, 88, q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert calls[0]["mask_shape"] == (2, 1, 3, 7) and calls[0]["head_dim"] == 96


def test_qformer_cross_attention_padding_mask_routes_through_the_kernel(monkeypatch):
    """The Q-Former's [B, 1, 1, L] key-padding mask is broadcast to a shape the kernel takes."""
    torch.manual_seed(0)
    cfg = QFormerConfig(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        encoder_hidden_size=32,
        num_query_tokens=4,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
    )
    model = QFormer(cfg, with_text=False).eval()
    queries = torch.randn(2, 4, 64)
    image = torch.randn(2, 5, 32)
    image_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    expected = model(queries, image, image_mask).last_hidden_state

    install_fake_npu(monkeypatch)
    kernel = install_torch_npu(monkeypatch)
    got = model(queries, image, image_mask).last_hidden_state

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Two self-attentions (no mask) and one cross-attention (layer 0; frequency 2).
    assert sorted(str(c["mask_shape"]) for c in kernel.calls) == ["(2, 1, 4, 5)", "None", "None"]
    assert all(c["head_dim"] == 16 and c["scale"] == pytest.approx(0.25) for c in kernel.calls)


def test_dropout_becomes_keep_prob(monkeypatch):
    q, k, v = qkv(1, 2, 2, 4, 4, 64)
    install_fake_npu(monkeypatch)
    kernel = install_torch_npu(monkeypatch)
    accelerator.attention_function(64)(q, k, v, dropout_p=0.1)
    assert kernel.calls[0]["keep_prob"] == pytest.approx(0.9)
