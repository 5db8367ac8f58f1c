"""Tensor- and pipeline-parallel decoder-only language models: OPT and the LLaMA family.

The decoder is written here from megatron-core's tensor-parallel primitives
(``ColumnParallelLinear``, ``RowParallelLinear``, ``VocabParallelEmbedding``,
``vocab_parallel_cross_entropy``) with attention through
``torch.nn.functional.scaled_dot_product_attention``; megatron-core's model classes are not
used because they need a GPU (see docs/design.md, "Parallel layout").

One class, :class:`ParallelCausalLM`, covers both architectures:

* ``arch="opt"``: learned absolute positions (offset 2, computed from the attention mask
  like Hugging Face's OPT), pre-LN ``LayerNorm``, ReLU FFN ``fc1``/``fc2``, final
  ``LayerNorm``, head tied to the token embedding.
* ``arch="llama"`` (LLaMA / Vicuna 1-3, Qwen2, Mistral, InternLM2): rotary position
  embedding in Hugging Face's ``rotate_half`` convention (so HF q/k weights load
  unpermuted), ``RMSNorm``, SwiGLU ``gate_proj``/``up_proj``/``down_proj``, optional
  grouped-query attention, untied head. The families differ by flags of the config:
  q/k/v and output-projection biases separately (Qwen2 has the first, not the second),
  a sliding attention window (Mistral), RoPE scaling (``linear``, ``llama3``, ``dynamic``
  as transformers computes them), a tied head; their tensor names are ``convert``'s business.

Module layout, the same for both architectures so that pipeline assembly is generic::

    embed_tokens      VocabParallelEmbedding              (pre_process)
    embed_positions   nn.Embedding, OPT only               (pre_process)
    layers            nn.ModuleList[DecoderLayer]          (global indices in layer_range)
      .input_layernorm, .self_attn.{q,k,v,o}_proj, .post_attention_layernorm,
      .mlp.{fc1,fc2} (OPT) or .mlp.{gate_proj,up_proj,down_proj} (LLaMA)
    norm              LayerNorm / RMSNorm                  (post_process)
    lm_head           ColumnParallelLinear, vocab-parallel (post_process)

Tensor parallelism: q/k/v, ``fc1``, ``gate_proj``/``up_proj`` and the head are split by
output rows (each rank holds whole attention heads), ``o_proj``/``fc2``/``down_proj`` by
input columns, the token embedding and the head by vocabulary rows. The vocabulary is
padded to a multiple of the TP size (Vicuna's 32001 rows do not divide); padded logits are
``-inf``, so they never win an argmax and carry no probability in the loss.

Pipeline parallelism: a stage is the same class with parts absent. ``pre_process`` keeps
the embeddings, ``post_process`` the final norm, head and loss, ``layer_range`` picks the
decoder layers; a middle stage maps ``hidden_states`` to ``hidden_states``. The attention
mask (and explicit ``position_ids`` if any) must travel with the hidden states, since
every stage builds its own attention mask and rotary angles from them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch
import torch.nn.functional as F
from megatron.core import ModelParallelConfig, tensor_parallel
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2_megatron import accelerator
from blip2_megatron.config import LLMConfig
from blip2_megatron.data.batch import IGNORE_INDEX
from blip2_megatron.models import cpu_linear
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)

OPT_POSITION_OFFSET = 2  # OPT's learned position table has 2 extra leading rows (a fairseq legacy)
INIT_STD = 0.02  # Hugging Face's initializer_range for OPT and LLaMA


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Rows of the vocab-parallel embedding and head: ``vocab_size`` rounded up to a multiple of ``tp``."""
    return math.ceil(vocab_size / tp) * tp


class LMOutput(dict):
    """What :meth:`ParallelCausalLM.forward` returns: a dict with attribute access.

    ``logits`` are vocab-parallel: this rank's ``[B, T, padded_vocab / tp]`` slice, padded
    columns at ``-inf`` (``None`` on a stage without the head). ``loss`` is the mean
    next-token cross entropy over labels != -100 (``None`` without labels).
    ``hidden_states`` is the output of a stage without the head, to be sent to the next
    pipeline stage. ``kv_cache`` is the updated cache when one was passed in.

    A dict (like transformers' ``ModelOutput``) rather than a dataclass: DeepSpeed ZeRO-3
    finds the output tensors to hook for its backward parameter gathering by walking
    tuples, lists and dicts only; a dataclass hides them and backward meets freed weights.
    """

    def __init__(
        self,
        logits: torch.Tensor | None = None,
        loss: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ):
        super().__init__(logits=logits, loss=loss, hidden_states=hidden_states, kv_cache=kv_cache)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class KVCache:
    """Keys and values of the positions seen so far, one ``(k, v)`` pair per local layer.

    Each tensor in ``layers`` is ``[batch, local kv heads, seen positions, head_dim]``.
    Without ``max_length`` new positions are concatenated on. With it (generation knows its
    final length: prompt + new tokens) each layer's keys and values live in one buffer
    ``[2, batch, heads, max_length, head_dim]`` allocated at the first update; a step writes
    its position in place and ``layers`` holds views of the filled part, so no step copies
    the positions before it (a longer input than ``max_length`` grows the buffer).
    Beam search re-orders the batch with :meth:`select`.
    """

    def __init__(self, max_length: int | None = None) -> None:
        self.max_length = max_length
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._buffers: list[torch.Tensor] = []  # with max_length: one [2, B, H, capacity, D] per layer

    @property
    def seq_length(self) -> int:
        """Number of positions already cached (0 before the first forward)."""
        return self.layers[0][0].shape[2] if self.layers else 0

    def update(
        self, layer_idx: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions of local layer ``layer_idx``; return all keys and values."""
        if layer_idx > len(self.layers):
            raise IndexError(
                f"KV cache has {len(self.layers)} layers; layer {layer_idx} cannot be appended yet"
            )
        if self.max_length is None:
            if layer_idx == len(self.layers):
                self.layers.append((key, value))
                return key, value
            past_key, past_value = self.layers[layer_idx]
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)
            self.layers[layer_idx] = (key, value)
            return key, value
        start = self.layers[layer_idx][0].shape[2] if layer_idx < len(self.layers) else 0
        end = start + key.shape[2]
        if layer_idx == len(self.layers):
            batch, heads, _, head_dim = key.shape
            buffer = key.new_empty(2, batch, heads, max(self.max_length, end), head_dim)
            self._buffers.append(buffer)
            self.layers.append((key, value))  # replaced below by views of the buffer
        buffer = self._buffers[layer_idx]
        if end > buffer.shape[3]:
            grown = buffer.new_empty(*buffer.shape[:3], max(end, 2 * buffer.shape[3]), buffer.shape[4])
            grown[:, :, :, :start] = buffer[:, :, :, :start]
            self._buffers[layer_idx] = buffer = grown
        buffer[0, :, :, start:end] = key
        buffer[1, :, :, start:end] = value
        self.layers[layer_idx] = (buffer[0, :, :, :end], buffer[1, :, :, :end])
        return self.layers[layer_idx]

    def select(self, batch_index: torch.Tensor, start: int = 0) -> None:
        """Keep (and duplicate) batch rows: ``cache[b] <- cache[batch_index[b]]`` in every layer.

        ``start`` > 0 says the positions before it are already equal in every row and the
        row it is taken from (beam search after the prompt: beams of one input share it), so
        only later positions move; the batch size must then stay the same.
        """
        if self.max_length is None:
            self.layers = [
                (k.index_select(0, batch_index), v.index_select(0, batch_index)) for k, v in self.layers
            ]
            return
        for layer_idx, buffer in enumerate(self._buffers):
            length = self.layers[layer_idx][0].shape[2]
            if start > 0 and batch_index.shape[0] == buffer.shape[1]:
                if start < length:
                    buffer[:, :, :, start:length] = buffer[:, :, :, start:length].index_select(1, batch_index)
            else:
                selected = buffer.new_empty(2, batch_index.shape[0], *buffer.shape[2:])
                selected[:, :, :, :length] = buffer[:, :, :, :length].index_select(1, batch_index)
                self._buffers[layer_idx] = buffer = selected
            self.layers[layer_idx] = (buffer[0, :, :, :length], buffer[1, :, :, :length])


# ---------------------------------------------------------------------------- building blocks
class RMSNorm(nn.Module):
    """LLaMA's RMSNorm, normalising in fp32 and scaling in the input dtype (as Hugging Face does)."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden = hidden_states.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(input_dtype)


def make_norm(cfg: LLMConfig, dtype: torch.dtype) -> nn.Module:
    if cfg.arch == "opt":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dtype)
    return RMSNorm(cfg.hidden_size, cfg.norm_eps, dtype)


def rope_inverse_frequencies(cfg: LLMConfig, device=None) -> torch.Tensor:
    """RoPE's inverse frequencies ``[head_dim / 2]`` in fp32, scaled as ``cfg.rope_type`` says.

    The maths of transformers' ``rope_parameters`` types, op for op (so the angles are the
    same floats): ``linear`` divides every frequency by the factor; ``llama3`` (Llama 3.1)
    divides the low frequencies (wavelengths above ``original / low_freq_factor``), keeps
    the high ones (below ``original / high_freq_factor``) and blends the ones in between;
    ``dynamic`` (NTK) only changes the base for sequences longer than
    ``max_position_embeddings``, which :class:`ParallelCausalLM` refuses, so it is the
    unscaled RoPE here.
    """
    dim = cfg.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.rope_factor
    if cfg.rope_type == "llama3":
        original = cfg.rope_original_max_positions
        low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(medium, blended, scaled)
    return inv_freq


def rotary_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE angles ``[B, 1, T, head_dim]`` for ``position_ids [B, T]``, in HF's half-split layout.

    Frequencies (:func:`rope_inverse_frequencies`) are computed in fp32 every call instead of
    being kept as a buffer: a buffer would be cast to fp16/bf16 by ``model.to(dtype)`` and
    lose precision at long positions.
    """
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, head_dim]`` by the angles of its positions."""
    return x * cos + _rotate_half(x) * sin


def opt_position_ids(
    attention_mask: torch.Tensor | None, past_length: int, seq_len: int, device
) -> torch.Tensor:
    """OPT's position ids ``[B, T]`` as Hugging Face computes them when none are given.

    Positions count the real tokens (``cumsum`` of the mask), so a left-padded prompt starts at
    position 0 like an unpadded one; padding gets -1 (row 1 of the table after the offset).
    """
    if attention_mask is None:
        return torch.arange(past_length, past_length + seq_len, device=device)[None]
    mask = attention_mask.long()
    positions = torch.cumsum(mask, dim=1) * mask - 1
    return positions[:, past_length:]


def _check_mask_length(attention_mask: torch.Tensor | None, query_len: int, past_length: int) -> None:
    if attention_mask is not None and attention_mask.shape[-1] != past_length + query_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds {past_length} "
            f"and {query_len} are new: it must cover past and new positions ({past_length + query_len})"
        )


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_len: int,
    past_length: int,
    sliding_window: int = 0,
    device: torch.device | None = None,
    right_padded: bool = False,
) -> tuple[torch.Tensor | None, bool]:
    """The ``(attn_mask, is_causal)`` pair for scaled_dot_product_attention.

    ``attention_mask`` is the usual ``[B, past + T]`` 0/1 padding mask. Without padding the
    causal fast path is used (no mask tensor); otherwise a boolean ``[B, 1, T, past + T]``
    mask (True = may attend) combines causality and key padding. ``right_padded`` (training
    batches, no cache) takes the causal path without looking at the mask: every real token
    sees only real tokens before it, padding comes after them, and what the padding
    positions compute carries no loss. That keeps SDPA on its flash / memory-efficient
    kernels and reads nothing from the device (the padding check otherwise does).
    ``sliding_window`` > 0 (Mistral) also hides keys ``sliding_window`` or more slots behind the query, as
    transformers' sliding-window mask does (slots, padding included, are what it counts);
    the cache keeps every key, the mask decides which ones count. ``device`` places a mask
    built without a padding mask (which otherwise gives the device).
    """
    _check_mask_length(attention_mask, query_len, past_length)
    kv_len = past_length + query_len
    if right_padded and past_length == 0:
        attention_mask = None  # see above: causality alone gives the real tokens' outputs
    no_padding = attention_mask is None or bool(attention_mask.bool().all())
    window_hides_keys = 0 < sliding_window < kv_len
    if no_padding and not window_hides_keys:
        if past_length == 0:
            return None, query_len > 1
        if query_len == 1:
            return None, False  # one new token may see every cached position
    if attention_mask is not None:
        device = attention_mask.device
    query_pos = torch.arange(past_length, kv_len, device=device)[:, None]
    key_pos = torch.arange(kv_len, device=device)[None, :]
    allowed = key_pos <= query_pos  # [T, past + T]
    if sliding_window:
        allowed = allowed & (key_pos > query_pos - sliding_window)
    if attention_mask is not None:
        allowed = allowed[None] & attention_mask.bool()[:, None, :]  # [B, T, past + T]
    if allowed.dim() == 2:
        allowed = allowed[None]
    # A left-padding query sees no real key at all; softmax over nothing is NaN, which would
    # leak into gradients through masked sums. Letting such a query attend to itself keeps it
    # finite; its output is never used (no loss, no real token attends to it).
    sees_nothing = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | (sees_nothing & (key_pos == query_pos))
    return allowed[:, None], False


def gather_from_tp_ranks(tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate the TP ranks' shards of ``tensor`` along ``dim`` (no autograd; every rank gets all).

    megatron-core's ``gather_from_tensor_model_parallel_region`` allocates on the current GPU
    and so fails on CPU; this is the device-agnostic equivalent for inference and export.
    """
    if state.tp_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    shards = [torch.empty_like(tensor) for _ in range(state.tp_size())]
    torch.distributed.all_gather(shards, tensor, group=state.tp_group())
    return torch.cat(shards, dim=dim)


def vocab_parallel_logits(
    lm_head: nn.Module, hidden_states: torch.Tensor, vocab_size: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """This rank's vocab-parallel logits from a column-parallel head, padded columns at ``-inf``.

    ``weight``: the head's weight when it reads another module's (a tied embedding).
    """
    logits = lm_head(hidden_states, weight=weight)[0]
    local_rows = logits.shape[-1]
    first = state.tp_rank() * local_rows
    if first + local_rows > vocab_size:
        padding = torch.arange(first, first + local_rows, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padding, float("-inf"))
    return logits


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of vocab-parallel ``logits [B, T, V / tp]`` against ``labels [B, T]``,
    over the labels that are not -100 (position t's logits score label t: shift before).

    Every position is scored and the unlabelled ones masked out, as Megatron's loss mask
    does: selecting the labelled positions instead would make the shape depend on the
    data, which waits for the device. With one TP rank this is torch's fused cross
    entropy; across ranks megatron's vocab-parallel one, on a copy (it works in place,
    and the logits are returned).
    """
    has_label = labels != IGNORE_INDEX
    if state.tp_size() == 1:
        per_token = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(labels)
    else:
        logits = logits.float() if logits.dtype != torch.float32 else logits.clone()
        per_token = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.clamp(min=0))
        per_token = torch.where(has_label, per_token, torch.zeros_like(per_token))
    # clamp: a batch without labelled tokens gives 0 (HF gives NaN) so a step never poisons the weights
    return per_token.sum() / has_label.sum().clamp(min=1)


def normal_init(std: float):
    return lambda tensor: nn.init.normal_(tensor, mean=0.0, std=std)


def _plain_linear(layer: nn.Module) -> bool:
    """Whether a megatron-core linear layer may run as plain ``F.linear``: one TP rank.

    megatron's forward wraps its matmul in autograd functions that exist for several TP
    ranks: an identity "copy to the TP region" before a column-parallel layer, an identity
    "reduce from it" after a row-parallel one (whose bias is then a separate add), and the
    product itself in a function that overlaps the input-gradient all-reduce with the
    weight-gradient matmul. With one rank there is nothing to communicate or overlap, and
    ``F.linear`` computes the same product, bias included, as one fused ``addmm`` with
    autograd's own backward (measured on CPU, forward + backward: the product alone 5-18%
    faster per layer; the tiny LLM's four decoder layers 17.1 ms instead of 18.9 ms).
    """
    return (
        layer.tp_group.size() == 1
        and not layer.sequence_parallel
        and not layer.explicit_expert_comm
        and not layer.config.defer_embedding_wgrad_compute
        and layer.config._cpu_offloading_context is None
    )


def _plain_forward(layer: nn.Module, input_: torch.Tensor, weight: torch.Tensor):
    """megatron's ``(output, bias)`` pair from one ``F.linear``: the bias inside it unless
    ``skip_bias_add`` hands it back for the caller to add. CPU generation computes it with a
    packed oneDNN weight (:mod:`~blip2_megatron.models.cpu_linear`)."""
    if layer.skip_bias_add:
        return cpu_linear.linear(input_, weight), layer.bias
    return cpu_linear.linear(input_, weight, layer.bias), None


@contextlib.contextmanager
def _in_weight_dtype(input_: torch.Tensor, weight: torch.Tensor):
    """Run megatron's split product in its weight's dtype, outside any autocast; yields the input.

    Under autocast (DeepSpeed's, for a trained ViT in bf16) an fp32 LLM's activations arrive
    in the autocast dtype and megatron's autograd functions would return autocast-dtype
    outputs whose gradients then meet the fp32 weight in their backward matmul, which
    fails; ``F.linear`` (TP 1) has autograd's own backward and casts consistently.
    """
    with torch.autocast(input_.device.type, enabled=False):
        yield input_ if input_.dtype == weight.dtype else input_.to(weight.dtype)


class ColumnParallelLinear(tensor_parallel.ColumnParallelLinear):
    """megatron-core's column-parallel linear; plain ``F.linear`` at TP 1 (:func:`_plain_linear`)."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        weight = self.weight if weight is None else weight
        if _plain_linear(self):
            return _plain_forward(self, input_, weight)
        with _in_weight_dtype(input_, weight) as input_:
            return super().forward(input_, weight, runtime_gather_output)


class RowParallelLinear(tensor_parallel.RowParallelLinear):
    """megatron-core's row-parallel linear; plain ``F.linear`` at TP 1 (:func:`_plain_linear`)."""

    def forward(self, input_):
        if _plain_linear(self):
            return _plain_forward(self, input_, self.weight)
        with _in_weight_dtype(input_, self.weight) as input_:
            return super().forward(input_)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention; this rank holds whole heads."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig, layer_index: int):
        super().__init__()
        tp = mp_config.tensor_model_parallel_size
        self.layer_index = layer_index
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp
        self.num_kv_heads = cfg.kv_heads // tp
        # OPT (as fairseq and HF) scales q before the product; same order, same rounding.
        self.scale_query_first = cfg.arch == "opt"
        hidden, init = cfg.hidden_size, normal_init(INIT_STD)
        column = dict(config=mp_config, init_method=init, bias=cfg.attention_bias, gather_output=False)
        self.q_proj = ColumnParallelLinear(hidden, cfg.num_heads * self.head_dim, **column)
        self.k_proj = ColumnParallelLinear(hidden, cfg.kv_heads * self.head_dim, **column)
        self.v_proj = ColumnParallelLinear(hidden, cfg.kv_heads * self.head_dim, **column)
        self.o_proj = RowParallelLinear(
            cfg.num_heads * self.head_dim,
            hidden,
            config=mp_config,
            init_method=init,
            bias=cfg.has_o_proj_bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, seq = x.shape[:2]
        return x.view(batch, seq, num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        cache_index: int,
    ) -> torch.Tensor:
        batch, seq = hidden_states.shape[:2]
        query = self.q_proj(hidden_states)[0]
        scale = None
        if self.scale_query_first:
            query = query * self.head_dim**-0.5
            scale = 1.0
        query = self._heads(query, self.num_heads)
        key = self._heads(self.k_proj(hidden_states)[0], self.num_kv_heads)
        value = self._heads(self.v_proj(hidden_states)[0], self.num_kv_heads)
        if rotary is not None:
            query, key = apply_rotary(query, *rotary), apply_rotary(key, *rotary)
        if kv_cache is not None:
            key, value = kv_cache.update(cache_index, key, value)
        out = accelerator.attention_function(self.head_dim)(
            query,
            key,
            value,
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)[0]


class OPTMLP(nn.Module):
    """``fc2(relu(fc1(x)))``: fc1 split by output rows, fc2 by input columns."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig):
        super().__init__()
        init = normal_init(INIT_STD)
        self.fc1 = ColumnParallelLinear(
            cfg.hidden_size,
            cfg.intermediate_size,
            config=mp_config,
            init_method=init,
            bias=cfg.attention_bias,
            gather_output=False,
        )
        self.fc2 = RowParallelLinear(
            cfg.intermediate_size,
            cfg.hidden_size,
            config=mp_config,
            init_method=init,
            bias=cfg.attention_bias,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)[0]))[0]


ACTIVATIONS = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu_new": functools.partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}


class GatedMLP(nn.Module):
    """A gated FFN ``down(act(gate(x)) * up(x))``: LLaMA's SwiGLU, T5 v1.1's gated GELU
    (``wi_0`` / ``wi_1`` / ``wo``); the activation is ``cfg.activation``."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig):
        super().__init__()
        self.act = ACTIVATIONS[cfg.activation]
        init = normal_init(INIT_STD)
        column = dict(config=mp_config, init_method=init, bias=False, gather_output=False)
        self.gate_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, **column)
        self.up_proj = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, **column)
        self.down_proj = RowParallelLinear(
            cfg.intermediate_size,
            cfg.hidden_size,
            config=mp_config,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]


class DecoderLayer(nn.Module):
    """One pre-LN decoder block; ``layer_index`` is its index in the whole model (not the stage)."""

    def __init__(self, cfg: LLMConfig, mp_config: ModelParallelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        dtype = mp_config.params_dtype
        self.input_layernorm = make_norm(cfg, dtype)
        self.self_attn = SelfAttention(cfg, mp_config, layer_index)
        self.post_attention_layernorm = make_norm(cfg, dtype)
        self.mlp = OPTMLP(cfg, mp_config) if cfg.arch == "opt" else GatedMLP(cfg, mp_config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = True,
        kv_cache: KVCache | None = None,
        cache_index: int = 0,
    ) -> torch.Tensor:
        attn = self.self_attn(
            self.input_layernorm(hidden_states), rotary, attn_mask, is_causal, kv_cache, cache_index
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def mark_partitioned_weights(model: nn.Module) -> None:
    """Make sure every split weight carries megatron's ``tensor_model_parallel`` / ``partition_dim``.

    megatron-core sets them only while drawing random weights; with
    ``perform_initialization=False`` (weights to be loaded) they would be missing, and the
    checkpoint converter, gradient-norm code and resharding tools read them.
    """
    split_dims = (
        (tensor_parallel.ColumnParallelLinear, 0),
        (tensor_parallel.RowParallelLinear, 1),
        (tensor_parallel.VocabParallelEmbedding, 0),
    )
    for module in model.modules():
        for cls, dim in split_dims:
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, cls)
                and weight is not None
                and not hasattr(weight, "tensor_model_parallel")
            ):
                tensor_parallel.set_tensor_model_parallel_attributes(
                    weight, is_parallel=True, dim=dim, stride=1
                )


# ---------------------------------------------------------------------------- the model
class ParallelCausalLM(nn.Module):
    """A decoder-only LM (OPT or LLaMA family) split over TP ranks, optionally one pipeline stage.

    Args:
        cfg: the LLM config; ``cfg.tp`` must equal the TP size of the running process groups
            (``state.initialize_model_parallel`` must have been called).
        pre_process: this stage holds the token (and OPT position) embeddings.
        post_process: this stage holds the final norm, the head and the loss.
        layer_range: ``(start, end)`` global indices of the decoder layers on this stage
            (half-open; default all layers).
        params_dtype: dtype of the parameters.
        init_weights: draw random initial weights; default ``not cfg.weights`` (pretrained
            weights will be loaded over them, and megatron-core's CPU initialisation draws
            every full weight matrix on every rank). Uninitialised parameters hold arbitrary
            values until loaded: the loader (``convert.hf_llm``) fails unless it sets every
            parameter of the stage.

    Tied embeddings (OPT): when the embedding and the head are on the same stage, the head
    reads the embedding's weight. On pipeline layouts where they are on different stages the
    head keeps its own copy (:attr:`holds_tied_head_copy`), loaded from the same checkpoint
    tensor; as in Megatron, the engine starts both equal and sums their gradients.
    """

    def __init__(
        self,
        cfg: LLMConfig,
        pre_process: bool = True,
        post_process: bool = True,
        layer_range: tuple[int, int] | None = None,
        params_dtype: torch.dtype = torch.float32,
        *,
        init_weights: bool | None = None,
    ):
        super().__init__()
        if not state.is_initialized():
            raise RuntimeError(
                "model-parallel groups are not initialised: call "
                "blip2_megatron.parallel.state.initialize_model_parallel(tp, pp) before building the LLM"
            )
        tp = state.tp_size()
        if cfg.tp != tp:
            raise ValueError(f"llm.tp={cfg.tp} but the running tensor-parallel group has {tp} ranks")
        start, end = layer_range if layer_range is not None else (0, cfg.num_layers)
        if not 0 <= start <= end <= cfg.num_layers:
            raise ValueError(f"layer_range={layer_range} is not within the model's {cfg.num_layers} layers")
        self.cfg = cfg
        self.pre_process = pre_process
        self.post_process = post_process
        self.layer_range = (start, end)
        self.vocab_size = cfg.vocab_size
        self.padded_vocab_size = padded_vocab_size(cfg.vocab_size, tp)
        self.grad_checkpointing = cfg.grad_checkpointing
        if init_weights is None:
            init_weights = not cfg.weights
        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            use_cpu_initialization=True,  # build wherever the default device is (CPU, meta), never on a GPU here
            perform_initialization=init_weights,
            params_dtype=params_dtype,
        )
        self.tie_word_embeddings = cfg.tie_word_embeddings
        self._head_reads_embedding = cfg.tie_word_embeddings and pre_process and post_process

        if pre_process:
            self.embed_tokens = tensor_parallel.VocabParallelEmbedding(
                self.padded_vocab_size, cfg.hidden_size, init_method=normal_init(INIT_STD), config=mp_config
            )
            if cfg.arch == "opt":
                self.embed_positions = nn.Embedding(
                    cfg.max_position_embeddings + OPT_POSITION_OFFSET, cfg.hidden_size, dtype=params_dtype
                )
        self.layers = nn.ModuleList(DecoderLayer(cfg, mp_config, index) for index in range(start, end))
        if post_process:
            self.norm = make_norm(cfg, params_dtype)
            self.lm_head = ColumnParallelLinear(
                cfg.hidden_size,
                self.padded_vocab_size,
                config=mp_config,
                init_method=normal_init(INIT_STD),
                bias=False,
                gather_output=False,
                skip_weight_param_allocation=self._head_reads_embedding,
            )
        mark_partitioned_weights(self)
        if init_weights:
            self._init_non_parallel_weights()
        if tp > 1 or self.padded_vocab_size != cfg.vocab_size:
            logger.info(
                "LLM stage: layers %d-%d of %d, tp=%d, vocab %d padded to %d",
                start,
                end - 1,
                cfg.num_layers,
                tp,
                cfg.vocab_size,
                self.padded_vocab_size,
            )

    @torch.no_grad()
    def _init_non_parallel_weights(self) -> None:
        """HF-style init of what megatron-core does not create, and zero rows for the vocab padding."""
        if self.pre_process and self.cfg.arch == "opt":
            nn.init.normal_(self.embed_positions.weight, std=INIT_STD)
        local_rows = self.padded_vocab_size // self.cfg.tp
        first_padding = max(self.vocab_size - state.tp_rank() * local_rows, 0)  # local row index
        if first_padding >= local_rows:
            return
        for name in ("embed_tokens", "lm_head"):
            module = getattr(self, name, None)
            if module is not None and getattr(module, "weight", None) is not None:
                module.weight[first_padding:] = 0.0

    @property
    def holds_tied_head_copy(self) -> bool:
        """This stage's head is a copy of a tied embedding that lives on the first stage (PP > 1).

        The copy and the embedding are one weight of the model: they start equal and their
        gradients are summed over the embedding group (``training/engine.py``).
        """
        return self.tie_word_embeddings and self.post_process and not self.pre_process

    # ------------------------------------------------------------------ pieces
    def get_input_embeddings(self) -> nn.Module:
        """The vocab-parallel token embedding (``[B, T] ids -> [B, T, H]``); stage 0 only."""
        if not self.pre_process:
            raise RuntimeError("this pipeline stage has no token embedding (pre_process=False)")
        return self.embed_tokens

    def add_positions(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_length: int = 0,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Input embeddings -> first hidden states: OPT adds learned positions, LLaMA nothing.

        Positions are computed over everything in ``inputs_embeds`` (for BLIP-2: the projected
        queries followed by the prompt and text tokens), exactly like Hugging Face's
        ``OPTForCausalLM(inputs_embeds=..., attention_mask=...)``.
        """
        if self.cfg.arch != "opt":
            return inputs_embeds
        if position_ids is None:
            position_ids = opt_position_ids(
                attention_mask, past_length, inputs_embeds.shape[1], inputs_embeds.device
            )
        return inputs_embeds + self.embed_positions(position_ids + OPT_POSITION_OFFSET).to(
            inputs_embeds.dtype
        )

    def embed(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> torch.Tensor:
        """Token ids -> first hidden states (token embedding plus OPT positions)."""
        return self.add_positions(
            self.get_input_embeddings()(input_ids), attention_mask, past_length, position_ids
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Normalised hidden states -> this rank's vocab-parallel logits, padded columns at -inf."""
        weight = self.embed_tokens.weight if self._head_reads_embedding else None
        return vocab_parallel_logits(self.lm_head, hidden_states, self.vocab_size, weight)

    def causal_lm_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross entropy of predicting token t+1 at position t, over labels != -100 (HF's shift)."""
        return token_cross_entropy(logits[:, :-1], labels[:, 1:])

    def default_position_ids(
        self, attention_mask: torch.Tensor | None, past_length: int, seq_len: int, device
    ) -> torch.Tensor:
        """Position ids when none are given, as Hugging Face's forward computes them.

        OPT counts real tokens from the mask; LLaMA counts positions (``past .. past + T``)
        whatever the padding, as ``LlamaModel`` does. Generation passes explicit ids instead.
        """
        if self.cfg.arch == "opt":
            return opt_position_ids(attention_mask, past_length, seq_len, device)
        return torch.arange(past_length, past_length + seq_len, device=device)[None]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        hidden_states: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        right_padded: bool = False,
        first_label: int = 0,
    ) -> LMOutput:
        """Run this stage.

        Args:
            input_ids: ``[B, T]`` token ids (first stage; or ``inputs_embeds``).
            inputs_embeds: ``[B, T, H]`` input embeddings (first stage), e.g. BLIP-2's query
                embeddings followed by token embeddings; OPT positions are added here.
            attention_mask: ``[B, past + T]``, 1 for real tokens, 0 for padding.
            labels: ``[B, T]`` token ids with -100 where no loss is taken (last stage).
            kv_cache: a :class:`KVCache` to read past positions from and append to (generation).
            hidden_states: ``[B, T, H]`` output of the previous stage (not the first stage).
            position_ids: ``[B, T]`` explicit positions (default: see :meth:`default_position_ids`).
            logits_to_keep: compute logits for the last this-many positions only (0 = all).
            right_padded: padding (if any) follows the real tokens of each row, as in the
                batch builder's training batches: attention is plainly causal
                (:func:`build_attention_mask`); positions still come from the mask.
            first_label: with ``labels``, no row has a label before this position: logits
                (and the loss) are computed from the position before it on, the only one
                of them whose logit predicts a label. The returned logits start there.
        """
        past_length = kv_cache.seq_length if kv_cache is not None else 0
        if self.pre_process:
            if hidden_states is not None:
                raise ValueError(
                    "the first pipeline stage takes input_ids or inputs_embeds, not hidden_states"
                )
            if (input_ids is None) == (inputs_embeds is None):
                raise ValueError("pass exactly one of input_ids and inputs_embeds")
            _check_mask_length(
                attention_mask, (input_ids if input_ids is not None else inputs_embeds).shape[1], past_length
            )
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            hidden_states = self.add_positions(inputs_embeds, attention_mask, past_length, position_ids)
        elif hidden_states is None:
            raise ValueError("a pipeline stage without embeddings (pre_process=False) needs hidden_states")

        batch, seq_len = hidden_states.shape[:2]
        attn_mask, is_causal = build_attention_mask(
            attention_mask, seq_len, past_length, self.cfg.sliding_window, hidden_states.device, right_padded
        )
        rotary = None
        if self.cfg.arch == "llama":
            if self.cfg.rope_type == "dynamic" and past_length + seq_len > self.cfg.max_position_embeddings:
                raise ValueError(
                    f"llm.rope_type='dynamic' rescales RoPE for sequences longer than "
                    f"llm.max_position_embeddings={self.cfg.max_position_embeddings}, which is not modelled; "
                    f"this sequence has {past_length + seq_len} positions"
                )
            if position_ids is None:
                position_ids = self.default_position_ids(
                    attention_mask, past_length, seq_len, hidden_states.device
                )
            rotary = rotary_cos_sin(
                position_ids.expand(batch, seq_len),
                rope_inverse_frequencies(self.cfg, hidden_states.device),
                hidden_states.dtype,
            )

        use_checkpointing = (
            self.grad_checkpointing and self.training and torch.is_grad_enabled() and kv_cache is None
        )
        for local_index, layer in enumerate(self.layers):
            if use_checkpointing:
                hidden_states = checkpoint(
                    layer, hidden_states, rotary, attn_mask, is_causal, None, local_index, use_reentrant=False
                )
            else:
                hidden_states = layer(hidden_states, rotary, attn_mask, is_causal, kv_cache, local_index)

        if not self.post_process:
            return LMOutput(hidden_states=hidden_states, kv_cache=kv_cache)
        if labels is not None and logits_to_keep:
            raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position")
        if labels is not None and first_label > 1:
            hidden_states, labels = hidden_states[:, first_label - 1 :], labels[:, first_label - 1 :]
        hidden_states = self.norm(hidden_states)
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.compute_logits(hidden_states)
        loss = self.causal_lm_loss(logits, labels) if labels is not None else None
        return LMOutput(logits=logits, loss=loss, kv_cache=kv_cache)
