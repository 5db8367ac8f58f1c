"""Linear layers at inference on CPU: oneDNN instead of MKL's sgemm.

``F.linear`` on a CPU goes to MKL's sgemm. At inference (autograd off, fp32) oneDNN's
product is as fast or faster at every size we run, for two reasons:

* **Few rows (the LLM's token steps).** Generating a token multiplies 8 rows (the batch) or
  40 (batch x beams) by every weight of the LLM, so a step is bound by reading weights.
  sgemm repacks the weight into its panel layout on every call, which at 8 or 40 rows is
  most of the time; oneDNN can pack a weight once into its blocked layout and then read it
  at close to memory bandwidth.
* **Many rows (the image path).** The ViT multiplies 197 rows per image, the Q-Former's
  cross-attention reads them: here oneDNN's own kernels, with the weight as it is (no
  packed copy), beat sgemm on the AVX2 AMD CPU of our CI (figures below; on other CPUs
  the two may be closer).

Measured on that 2-core CPU, fp32. The LLM's products (ms per call, F.linear -> packed;
repeated calls on one weight, so partly from cache; inside a generation step the weights
come from memory and the packed products run at ~9-10 GB/s, F.linear's at 2-4 GB/s):

    rows   768x768    768->3072   3072->768   head 768->50272
      8    0.25->0.14  2.67->0.45  1.60->0.44  50.5->16.5
     40    0.80->0.55  2.94->2.06  2.43->2.30  89.5->34.2

The image path (ViT 12x768 and Q-Former 12x768 on 8 images, projected; alternating calls,
median of 5): 4.30 s through F.linear, 3.70 s through unpacked oneDNN. Single products at
1576 rows gain 0-25% by shape (768->3072 the most, 3072->768 the least), and a packed
weight does no better there than an unpacked one.

So two entry points, both ``F.linear`` wherever they do not apply:

* :func:`linear` (``pack=True``): the LLM's linears (decoder-only and FlanT5, head
  included) at TP 1, where they are a plain product (``llm._plain_forward``; at TP > 1
  megatron's split product keeps its own matmul). The packed copy is an extra copy of the
  weight: we pack only while at least a fifth of the machine's memory would stay
  available. It is kept per weight tensor and made again when the weight changes (a new
  storage or an in-place write: loading weights, an optimizer step).
* :class:`Linear` (``pack=False``): ``nn.Linear`` of the ViT and the Q-Former (same
  parameters and state-dict names). No copy: a ViT-g would need 4 GB more, and at their
  row counts the packed weight buys nothing.

Either applies when all of these hold: the tensors are fp32 on the CPU, autograd is off
(generation, evaluation's scoring, prediction, chat; training keeps ``F.linear``, whose
backward the oneDNN op lacks, frozen encoders included), no autocast is active, and this
torch has oneDNN.
The products equal ``F.linear``'s to float rounding (oneDNN sums in another order: max
|diff| ~1e-4 on logits of magnitude ~30 at the sizes above, ~4e-6 on the projected image
embeddings of the mid-size model); the generation tests compare tokens against
transformers through this path.
"""

from __future__ import annotations

import logging
import weakref

import psutil
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# Memory that must stay available after a weight is packed, as a share of the machine's.
KEEP_AVAILABLE = 0.2

_packed: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # id(weight) -> (version, packed)
_state = {"usable": torch.backends.mkldnn.is_available(), "memory_warned": False}


def _applies(input_: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        not torch.is_grad_enabled()  # first: training leaves here
        and _state["usable"]
        and input_.device.type == "cpu"
        and weight.dim() == 2
        and input_.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.is_autocast_enabled("cpu")
    )


def _room_for(nbytes: int) -> bool:
    memory = psutil.virtual_memory()
    if memory.available - nbytes >= KEEP_AVAILABLE * memory.total:
        return True
    if not _state["memory_warned"]:
        _state["memory_warned"] = True
        logger.warning(
            "CPU inference: not packing more LLM weights for oneDNN (%.1f GiB available of %.1f GiB); "
            "the rest run through F.linear, slower but in place",
            memory.available / 2**30,
            memory.total / 2**30,
        )
    return False


def _packed_weight(weight: torch.Tensor) -> torch.Tensor | None:
    version = (weight.data_ptr(), weight._version)
    key = id(weight)
    held = _packed.get(key)
    if held is not None and held[0] == version:
        return held[1]
    if held is None:
        if not _room_for(weight.numel() * weight.element_size()):
            return None
        weakref.finalize(weight, _packed.pop, key, None)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach())
    _packed[key] = (version, packed)
    return packed


def linear(
    input_: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, pack: bool = True
) -> torch.Tensor:
    """``F.linear(input_, weight, bias)``, through oneDNN where that applies (see the module
    docstring): with a packed copy of ``weight`` kept for later calls (``pack``), or with
    ``weight`` as it is."""
    if not _applies(input_, weight, bias):
        return F.linear(input_, weight, bias)
    if pack:
        weight_arg = _packed_weight(weight)
        if weight_arg is None:
            return F.linear(input_, weight, bias)
    else:
        weight_arg = weight.contiguous()
    rows = input_.reshape(-1, input_.shape[-1]).contiguous()
    try:
        out = torch.ops.mkldnn._linear_pointwise(rows, weight_arg, bias, "none", [], "")
    except RuntimeError as err:  # a build whose oneDNN lacks the op: use F.linear from now on
        _state["usable"] = False
        _packed.clear()
        logger.warning("CPU inference: oneDNN linear unavailable (%s); using F.linear", err)
        return F.linear(input_, weight, bias)
    return out.reshape(*input_.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` whose CPU inference product is oneDNN's, on the weight as it is
    (:func:`linear` with ``pack=False``); the image path's layers."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        return linear(input_, self.weight, self.bias, pack=False)
