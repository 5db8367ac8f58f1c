"""The LLM's linear layers at inference on CPU: oneDNN with weights packed once.

Generating a token multiplies a few rows (the batch, or batch x beams) by every weight of
the LLM, so each step is bound by reading the weights, not by arithmetic. ``F.linear``
goes to MKL's sgemm, which repacks the weight into its panel layout on every call: at 8
or 40 rows that repacking is most of the time. oneDNN can pack a weight once into its
blocked layout and then read it at close to memory bandwidth. Measured on the 2-core CPU
of our CI, fp32, OPT-125M shapes (ms per call, F.linear -> packed):

    rows   768x768    768->3072   3072->768   head 768->50272
      8    0.25->0.14  2.67->0.45  1.60->0.44  50.5->16.5
     40    0.80->0.55  2.94->2.06  2.43->2.30  89.5->34.2
   1576    16.9->15.9  63.6->60.4  65.3->58.4       -

(Repeated calls on one weight, so partly from cache; inside a generation step the weights
come from memory and the packed products run at ~9-10 GB/s, F.linear's at 2-4 GB/s.)
The ViT's 1576 rows gain ~5%, not worth a second copy of its weights: it keeps F.linear.
So the LLM's linears (decoder-only and FlanT5, head included) compute through
:func:`linear` at TP 1, where they are a plain product (``llm._plain_forward``; at TP > 1
megatron's split product keeps its own matmul), and :func:`linear` uses a packed copy of the weight when all of these hold: the tensors
are fp32 on the CPU, autograd is off (generation; training keeps ``F.linear``, whose
backward the packed op lacks), no autocast is active, and the packed copy fits in memory
(it is an extra copy of the weight: we pack only while at least a fifth of the machine's
memory would stay available). Anything else, or a torch without oneDNN, is ``F.linear``.
The packed copy is kept per weight tensor and made again when the weight changes (a new
storage or an in-place write: loading weights, an optimizer step).

The products equal ``F.linear``'s to float rounding (oneDNN sums in another order: max
|diff| ~1e-4 on logits of magnitude ~30 at the sizes above); the generation tests compare
tokens against transformers through this path.
"""

from __future__ import annotations

import logging
import weakref

import psutil
import torch
import torch.nn.functional as F

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
            "CPU generation: not packing more LLM weights for oneDNN (%.1f GiB available of %.1f GiB); "
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


def linear(input_: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(input_, weight, bias)``, through a packed oneDNN weight where that applies
    (see the module docstring)."""
    if not _applies(input_, weight, bias):
        return F.linear(input_, weight, bias)
    packed = _packed_weight(weight)
    if packed is None:
        return F.linear(input_, weight, bias)
    rows = input_.reshape(-1, input_.shape[-1]).contiguous()
    try:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    except RuntimeError as err:  # a build whose oneDNN lacks the op: use F.linear from now on
        _state["usable"] = False
        _packed.clear()
        logger.warning("CPU generation: oneDNN linear unavailable (%s); using F.linear", err)
        return F.linear(input_, weight, bias)
    return out.reshape(*input_.shape[:-1], weight.shape[0])
