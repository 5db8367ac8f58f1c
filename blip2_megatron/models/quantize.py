"""Quantized frozen LLMs: LLM.int8 and NF4 weights through bitsandbytes, for one-device inference.

``llm.quantize`` replaces every tensor-parallel linear layer of a frozen LLM (q/k/v/o,
the FFN; the decoder-only LLMs and FlanT5 alike) by a bitsandbytes layer after its weights
are loaded (``build.build_model``):

* ``int8``: LLM.int8 (``Linear8bitLt``), int8 weights with one fp32 scale per output row;
  input columns holding a value above 6.0 (:data:`INT8_OUTLIER_THRESHOLD`) are multiplied
  in half precision, the rest in int8. About half the bytes of bf16 weights.
* ``nf4``: 4-bit NormalFloat (``Linear4bit``) in blocks of 64 weights, with double
  quantization (the blocks' fp32 scales are themselves quantized to 8 bits), computed in
  the dtype the LLM was built in. About 0.27x the bytes of bf16 weights.

What stays unquantized, as transformers' ``llm_int8_skip_modules`` keeps it for BLIP-2:
the token (and position) embeddings, the head (``lm_head``, tied or not), the norms, T5's
relative-position table, and everything outside the LLM (ViT, Q-Former, projection). A
replaced layer keeps the interface of ours: calling it returns ``(output, bias or None)``.

With the same weights and the same settings these are the very layers
``Blip2ForConditionalGeneration.from_pretrained(..., quantization_config=BitsAndBytesConfig(
load_in_8bit=True))`` (or ``load_in_4bit`` NF4 with double quantization) builds, so at TP 1
greedy tokens equal transformers' (tests/test_quantize.py).

Tensor parallelism. Each rank quantizes its own shard:

* a column-parallel shard holds whole output rows, so int8's per-row scales are exactly
  those of the whole weight and the shard's int8 rows equal TP 1's; NF4's 64-weight blocks
  fall within rows (input widths are multiples of 64), so its 4-bit codes and first-level
  scales equal TP 1's too, but double quantization subtracts the mean of the shard's
  scales (not the whole weight's) before quantizing them: their 8-bit rounding differs;
* a row-parallel shard holds a slice of every input row: int8's per-row scale is the
  maximum over that slice, not the whole row, and NF4's blocks and scale means are the
  shard's (an outlier column of LLM.int8 is likewise judged per shard). The output is the
  all-reduce over the TP group of the local quantized products, and the bias is added
  once, after it. This is a different (per rank finer) quantization, not TP 1's.

Measured on the tiny OPT of tests/test_quantize.py (width 64, fp32 compute; logits of
standard deviation 2.6; 32 positions x 512 tokens), TP 2 against TP 1 (unquantized: 6e-6):

=====  ===================  ====================  ================  =======================
mode   largest |logit diff|  mean |logit diff|     argmax agrees     quantized vs dense, mean
=====  ===================  ====================  ================  =======================
int8   0.26                  0.035                 97% of positions  0.046
nf4    1.37                  0.17                  94% of positions  0.40
=====  ===================  ====================  ================  =======================

So TP 2 is a different quantization about as far from TP 1 as quantizing is from the dense
model, smaller on average. Greedy 10-token captions: identical for int8; for nf4 one
of two captions ended 7 tokens early (its row-parallel shards are 32 weights wide there,
so a 64-weight block spans two rows; at real widths, 1280 and more per shard, blocks stay
within rows). The test holds TP 2 to: largest difference <= 0.5 (int8) / 2.0 (nf4),
mean difference below quantized-vs-dense, argmax agreement >= 90%, int8 tokens identical.

Loading a directory that transformers saved quantized (``quantization_config`` with
``quant_method: bitsandbytes``; a whole Blip2 directory, or a stand-alone LLM directory as
``llm.weights``, whose mode ``llm.quantize`` must then match):
:func:`dequantize_bnb_tensors` turns its int8 / 4-bit tensors back into the dense weights
they encode and the LLM is quantized again on loading, in the mode
:func:`mode_from_quantization_config` reads. For int8 this gives
back the stored int8 weights and scales bit for bit (the stored scale is the row's
largest magnitude, an fp16 value, which dequantizing and re-quantizing reproduces). For
NF4 the 4-bit codes and first-level scales come back exactly; the double quantization
of the scales is redone from dequantized scales, so it may differ in the last 8-bit step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from megatron.core import tensor_parallel
from torch import nn

from blip2_megatron.config import ConfigError

logger = logging.getLogger(__name__)

INT8_OUTLIER_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)
NF4_BLOCKSIZE = 64  # weights per 4-bit block (bitsandbytes' default, as transformers uses it)
NESTED_BLOCKSIZE = 256  # first-level scales per block of the double quantization (bitsandbytes')
NF4_CODE_ENTRIES = 16  # the NF4 code book, fp32
NESTED_CODE_ENTRIES = 256  # the 8-bit dynamic code book of the double quantization, fp32
# Layers kept unquantized although they are parallel linears: the head (vocab-parallel).
UNQUANTIZED_LAYERS = ("lm_head",)
# Tensors bitsandbytes stores beside a quantized ``weight`` (transformers' save_pretrained).
_INT8_EXTRAS = ("SCB", "weight_format")
_FOUR_BIT_EXTRAS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _parallel_linears() -> tuple[type, ...]:
    return (tensor_parallel.ColumnParallelLinear, tensor_parallel.RowParallelLinear)


class QuantizedParallelLinear(nn.Module):
    """A bitsandbytes layer behind the ``(output, bias or None)`` interface of our parallel linears.

    ``quantized`` holds this rank's shard. Column-parallel (``reduce_group`` None): the
    product of the whole input and the local rows; the input gradient is summed over the
    TP group in backward (megatron's copy-to-region), as the unquantized layer does.
    Row-parallel under TP > 1: the local product is summed over ``reduce_group``, then the
    bias (held here, not in ``quantized``) is added once. The input is cast to the dtype
    the weights were kept in (outside autocast), as the unquantized layers compute.
    """

    def __init__(
        self,
        quantized: nn.Module,
        compute_dtype: torch.dtype,
        copy_group: Any = None,
        reduce_group: Any = None,
        bias: torch.Tensor | None = None,
        skip_bias_add: bool = False,
    ):
        super().__init__()
        self.quantized = quantized
        self.compute_dtype = compute_dtype
        self.copy_group = copy_group
        self.reduce_group = reduce_group
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.skip_bias_add = skip_bias_add

    @property
    def weight(self) -> torch.Tensor:
        """The quantized weight (int8 rows, or packed 4-bit codes); not a dense matrix."""
        return self.quantized.weight

    def forward(self, input_: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        if weight is not None:
            raise ValueError(
                "a quantized layer multiplies by its own weight (the head, which reads a tied one, is not quantized)"
            )
        with torch.autocast(input_.device.type, enabled=False):
            hidden = input_.to(self.compute_dtype)
            if self.copy_group is not None:
                hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.copy_group)
            output = self.quantized(hidden)
            if self.reduce_group is not None:
                output = tensor_parallel.reduce_from_tensor_model_parallel_region(
                    output, group=self.reduce_group
                )
        if self.bias is None or self.skip_bias_add:
            return output, self.bias
        return output + self.bias, None

    def extra_repr(self) -> str:
        kind = "row-parallel, all-reduced" if self.reduce_group is not None else "column-parallel"
        return f"{kind}, compute {str(self.compute_dtype).removeprefix('torch.')}"


def _bnb():
    import bitsandbytes

    return bitsandbytes


def _quantized_copy(layer: nn.Module, mode: str, device: torch.device) -> QuantizedParallelLinear:
    """``layer`` (this rank's shard) as a bitsandbytes layer on ``device``; quantized while moving there.

    bitsandbytes quantizes a weight when it moves from the host to a device (the host
    included); the dense shard therefore goes through host memory, one layer at a time.
    """
    bnb = _bnb()
    weight = layer.weight.detach()
    compute_dtype = weight.dtype
    out_features, in_features = weight.shape
    tp = layer.tp_group.size() if getattr(layer, "tp_group", None) is not None else 1
    row_parallel = isinstance(layer, tensor_parallel.RowParallelLinear)
    if getattr(layer, "gather_output", False):
        raise ValueError("a column-parallel layer that gathers its output is not quantized here")
    bias = layer.bias.detach() if layer.bias is not None else None
    # The bias goes into bitsandbytes' product where that is the whole output (TP 1, or a
    # column shard), as transformers runs it; a row shard's partial output gets it after the sum.
    bias_inside = bias is not None and not layer.skip_bias_add and not (row_parallel and tp > 1)
    with torch.device("meta"):
        if mode == "int8":
            quantized = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                bias=bias_inside,
                has_fp16_weights=False,
                threshold=INT8_OUTLIER_THRESHOLD,
            )
        else:
            quantized = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=bias_inside,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
    host_weight = weight.cpu()
    if mode == "int8":
        quantized.weight = bnb.nn.Int8Params(host_weight, requires_grad=False, has_fp16_weights=False)
    else:
        quantized.weight = bnb.nn.Params4bit(
            host_weight,
            requires_grad=False,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            quant_type="nf4",
            module=quantized,
        )
    if bias_inside:
        quantized.bias = nn.Parameter(bias.cpu(), requires_grad=False)
    quantized = quantized.to(device)
    group = layer.tp_group if tp > 1 else None
    return QuantizedParallelLinear(
        quantized,
        compute_dtype,
        copy_group=group if not row_parallel else None,
        reduce_group=group if row_parallel else None,
        bias=None if bias_inside or bias is None else bias.to(device),
        skip_bias_add=layer.skip_bias_add,
    )


def quantize_llm(language_model: nn.Module, mode: str, device: torch.device | str | None = None) -> int:
    """Replace ``language_model``'s parallel linear layers (not the head) by ``mode`` ones, in place.

    ``mode`` is ``llm.quantize``; ``device`` is where the quantized layers go (default:
    where each weight is). Returns the number of layers replaced. The weights must be
    loaded already: quantization reads them once.
    """
    if mode == "none":
        return 0
    if mode not in ("int8", "nf4"):
        raise ValueError(f"unknown quantization {mode!r} (none, int8, nf4)")
    targets = quantized_layer_names(language_model)
    dense = quantized = 0
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = language_model.get_submodule(parent_name)
        layer = getattr(parent, child)
        target = torch.device(device) if device is not None else layer.weight.device
        dense += weight_bytes(layer)
        replacement = _quantized_copy(layer, mode, target)
        setattr(parent, child, replacement)
        quantized += weight_bytes(replacement)
    language_model.quantization = mode
    # LLM.int8 multiplies in fp16 by design; bitsandbytes says so at every product of fp32 inputs.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    logger.info(
        "LLM quantized to %s: %d linear layers, their weights %.1f MiB -> %.1f MiB on this rank",
        mode,
        len(targets),
        dense / 2**20,
        quantized / 2**20,
    )
    return len(targets)


# ------------------------------------------------------------------------------ memory
def _quantization_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Tensors a bitsandbytes layer keeps outside its parameters: int8 row scales, 4-bit block scales and code books."""
    tensors = []
    weight = getattr(module, "weight", None)
    state = getattr(module, "state", None)  # Linear8bitLt moves the scales here at its first forward
    for holder in (weight, state):
        scales = getattr(holder, "SCB", None)
        if isinstance(scales, torch.Tensor):
            tensors.append(scales)
    quant_state = getattr(weight, "quant_state", None)
    while quant_state is not None:
        tensors += [t for t in (quant_state.absmax, quant_state.code, quant_state.offset) if t is not None]
        quant_state = quant_state.state2
    return tensors


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters, buffers and quantization statistics, each storage counted once."""
    seen: dict[tuple[str, int], int] = {}
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        tensors += _quantization_tensors(sub)
    for tensor in tensors:
        if tensor.device.type == "meta":
            key = ("meta", id(tensor))
        else:
            key = (tensor.device.type, tensor.untyped_storage().data_ptr())
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def quantized_linear_bytes(out_features: int, in_features: int, mode: str, dtype_bytes: int) -> int:
    """Bytes one ``[out, in]`` weight takes quantized in ``mode`` (``dtype_bytes`` per weight unquantized).

    int8: one byte per weight and an fp32 scale per row. nf4: half a byte per weight, an
    8-bit scale per 64-weight block, and the double quantization's fp32 scale per 256
    blocks, its offset and the two code books (16 and 256 fp32 entries).
    """
    count = out_features * in_features
    if mode == "none":
        return count * dtype_bytes
    if mode == "int8":
        return count + 4 * out_features
    blocks = math.ceil(count / NF4_BLOCKSIZE)
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return math.ceil(count / 2) + blocks + 4 * nested + 4 + 4 * (NF4_CODE_ENTRIES + NESTED_CODE_ENTRIES)


def quantized_layer_names(language_model: nn.Module) -> list[str]:
    """Names of the layers :func:`quantize_llm` replaces (works on a meta-device model)."""
    return [
        name
        for name, module in language_model.named_modules()
        if isinstance(module, _parallel_linears()) and name.rpartition(".")[2] not in UNQUANTIZED_LAYERS
    ]


# ------------------------------------------------------------------------------ pre-quantized
def mode_from_quantization_config(quantization: Mapping[str, Any]) -> str:
    """``llm.quantize`` for a transformers ``quantization_config``; refuses what is not modelled.

    bitsandbytes 8-bit with the outlier threshold 6.0 is ``int8``; 4-bit NF4 is ``nf4``
    (re-quantized with double quantization, which a directory saved without it then gains).
    """
    method = quantization.get("quant_method")
    if method != "bitsandbytes":
        raise ConfigError(
            f"quantization_config quant_method={method!r}: only bitsandbytes' 8-bit and 4-bit NF4 weights "
            "are modelled (llm.quantize int8 / nf4)"
        )
    if quantization.get("load_in_8bit"):
        threshold = quantization.get("llm_int8_threshold", INT8_OUTLIER_THRESHOLD)
        if threshold != INT8_OUTLIER_THRESHOLD:
            raise ConfigError(
                f"quantization_config llm_int8_threshold={threshold}: llm.quantize=int8 uses "
                f"{INT8_OUTLIER_THRESHOLD} (LLM.int8's); other thresholds are not modelled"
            )
        if quantization.get("llm_int8_has_fp16_weight"):
            raise ConfigError(
                "quantization_config llm_int8_has_fp16_weight=true (trainable int8) is not modelled"
            )
        return "int8"
    if quantization.get("load_in_4bit"):
        kind = quantization.get("bnb_4bit_quant_type", "fp4")
        if kind != "nf4":
            raise ConfigError(
                f"quantization_config bnb_4bit_quant_type={kind!r}: only NF4 is modelled (llm.quantize=nf4)"
            )
        return "nf4"
    raise ConfigError(f"quantization_config without load_in_8bit or load_in_4bit: {dict(quantization)}")


def is_bnb_extra_key(key: str) -> bool:
    """Whether ``key`` is a statistic bitsandbytes stores beside a quantized weight (not a weight itself)."""
    module, _, leaf = key.rpartition(".")
    if leaf in _INT8_EXTRAS:
        return True
    if module.endswith(".weight") and leaf in _FOUR_BIT_EXTRAS:
        return True
    return ".weight.quant_state.bitsandbytes__" in key


def dequantize_bnb_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with bitsandbytes-quantized weights (as transformers saves them) made dense again.

    int8 ``weight`` + ``SCB`` -> ``weight * SCB / 127`` in fp32; 4-bit packed ``weight`` +
    its statistics -> the dense weight in the dtype it was quantized from. The statistics
    are dropped; other tensors pass unchanged. A dict without quantized weights is
    returned as it is.
    """
    if not any(is_bnb_extra_key(key) for key in tensors):
        return dict(tensors)
    functional = _bnb().functional
    dense: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if is_bnb_extra_key(key):
            continue
        module = key.removesuffix(".weight")
        if key.endswith(".weight") and f"{module}.SCB" in tensors:
            dense[key] = functional.int8_vectorwise_dequant(tensor, tensors[f"{module}.SCB"])
        elif f"{key}.absmax" in tensors:
            stats = {name: value for name, value in tensors.items() if name.startswith(f"{key}.")}
            quant_state = functional.QuantState.from_dict(stats, device=tensor.device)
            dense[key] = functional.dequantize_4bit(tensor, quant_state)
        else:
            dense[key] = tensor
    return dense
