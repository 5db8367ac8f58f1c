"""CPU inference's linear layers: oneDNN where it applies (packed weights for the LLM, the
weights as they are for the image path), F.linear elsewhere.

The generation parity tests (test_generation, test_blip2_hf, test_blip2_t5, test_llm_tp,
test_instructblip) compare tokens with transformers through this path; here: the product
itself, when the path applies, and that it follows the weight.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from blip2_megatron.config import QFormerConfig, VisionConfig
from blip2_megatron.models import cpu_linear
from blip2_megatron.models.qformer import QFormer
from blip2_megatron.models.vision import VisionEncoder

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN: F.linear is the only path"
)


def _weights(out_features: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    return weight, torch.randn(out_features, generator=generator)


@pytest.mark.parametrize("rows", [1, 8, 40, 300])
@pytest.mark.parametrize("with_bias", [True, False])
def test_packed_product_equals_f_linear(rows, with_bias):
    weight, bias = _weights(96, 64)
    bias = bias if with_bias else None
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        got = cpu_linear.linear(x, weight, bias)
    assert id(weight) in cpu_linear._packed  # the packed path ran
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, rows, 96)


def test_non_contiguous_rows_are_read_in_order():
    weight, bias = _weights(48, 32)
    x = torch.randn(32, 10).t()  # [10, 32], a transposed view
    with torch.no_grad():
        torch.testing.assert_close(cpu_linear.linear(x, weight, bias), F.linear(x, weight, bias))


def test_training_keeps_f_linear_and_its_gradients():
    weight, bias = _weights(24, 16)
    weight.requires_grad_(True)
    x = torch.randn(3, 16, requires_grad=True)
    out = cpu_linear.linear(x, weight, bias)
    assert torch.equal(out, F.linear(x, weight, bias))
    out.sum().backward()
    assert x.grad is not None and weight.grad is not None
    assert id(weight) not in cpu_linear._packed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_keep_f_linear(dtype):
    weight, bias = (t.to(dtype) for t in _weights(24, 16))
    x = torch.randn(3, 16, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(cpu_linear.linear(x, weight, bias), F.linear(x, weight, bias))
    assert id(weight) not in cpu_linear._packed


def test_a_changed_weight_is_packed_again():
    """Loading weights (an in-place copy) or replacing the storage must not leave a stale pack."""
    weight, bias = _weights(40, 20)
    x = torch.randn(4, 20)
    with torch.no_grad():
        cpu_linear.linear(x, weight, bias)
        new_weight, _ = _weights(40, 20, seed=1)
        weight.copy_(new_weight)
        torch.testing.assert_close(cpu_linear.linear(x, weight, bias), F.linear(x, new_weight, bias))
        weight.data = torch.zeros(40, 20)
        torch.testing.assert_close(cpu_linear.linear(x, weight, bias), bias.expand(4, 40))


def test_a_freed_weight_drops_its_pack():
    weight, _ = _weights(16, 8)
    key = id(weight)
    with torch.no_grad():
        cpu_linear.linear(torch.randn(2, 8), weight)
    assert key in cpu_linear._packed
    del weight
    assert key not in cpu_linear._packed


def test_without_room_for_a_packed_copy_it_stays_f_linear(monkeypatch, caplog):
    monkeypatch.setattr(cpu_linear, "KEEP_AVAILABLE", 1.0)  # no memory may be spent
    monkeypatch.setitem(cpu_linear._state, "memory_warned", False)
    weight, bias = _weights(24, 16)
    x = torch.randn(3, 16)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger=cpu_linear.__name__):
        first = cpu_linear.linear(x, weight, bias)
        cpu_linear.linear(x, weight, bias)
    assert torch.equal(first, F.linear(x, weight, bias))
    assert id(weight) not in cpu_linear._packed
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1  # warned once
    assert "not packing" in caplog.records[0].message


def _refuse_f_linear(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("F.linear was called: the oneDNN path did not apply")

    monkeypatch.setattr(cpu_linear.F, "linear", refused)


@pytest.mark.parametrize("rows", [1, 197, 600])
@pytest.mark.parametrize("with_bias", [True, False])
def test_unpacked_product_equals_f_linear_and_keeps_no_copy(monkeypatch, rows, with_bias):
    weight, bias = _weights(96, 64)
    bias = bias if with_bias else None
    x = torch.randn(2, rows, 64)
    expected = F.linear(x, weight, bias)
    _refuse_f_linear(monkeypatch)
    with torch.no_grad():
        got = cpu_linear.linear(x, weight, bias, pack=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert id(weight) not in cpu_linear._packed


def test_linear_module_is_an_nn_linear_with_its_names_and_its_training(monkeypatch):
    """The image path's layer: nn.Linear's parameters, state dict and gradients; oneDNN only
    without autograd."""
    reference = torch.nn.Linear(32, 48)
    layer = cpu_linear.Linear(32, 48)
    layer.load_state_dict(reference.state_dict())
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 7, 32, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, reference(x))  # training: F.linear itself
    out.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    expected = reference(x).detach()
    _refuse_f_linear(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert id(layer.weight) not in cpu_linear._packed


def test_every_linear_of_the_image_path_is_the_oneDNN_layer():
    """A plain nn.Linear added to the ViT or the Q-Former would silently run at MKL's speed."""
    vision = VisionEncoder(
        VisionConfig(
            image_size=32, patch_size=8, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256
        )
    )
    qformer = QFormer(
        QFormerConfig(
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            intermediate_size=128,
            vocab_size=100,
            bos_token_id=99,
            encoder_hidden_size=64,
        )
    )
    linears = [m for part in (vision, qformer) for m in part.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 10
    assert all(type(m) is cpu_linear.Linear for m in linears)
