"""The image encoder: EVA ViT-g/14 (BLIP-2's default) or CLIP ViT-L/14.

Parameter names are those of Hugging Face ``Blip2VisionModel`` (``embeddings.*``,
``encoder.layers.{i}.self_attn.qkv`` ..., ``post_layernorm``), so a Hugging Face state
dict loads with a plain ``load_state_dict``. ``post_layernorm`` plays the part of LAVIS's
``ln_vision``: it is applied to every output token and always computed in fp32.

Precision: a frozen encoder may keep its Linear/Conv weights in half precision while
LayerNorms and embeddings stay fp32 (LAVIS's ``convert_weights_to_fp16``). The forward
therefore casts each matmul input to that layer's weight dtype and keeps the residual
stream in the dtype of the position embedding, which reproduces what LAVIS gets from
autocast without needing an autocast context.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from blip2_megatron import accelerator
from blip2_megatron.config import VisionConfig
from blip2_megatron.models import cpu_linear

logger = logging.getLogger(__name__)


def interpolate_position_embedding(pos_embed: torch.Tensor, new_num_patches: int) -> torch.Tensor:
    """Resize a ``[1, 1 + n, D]`` position embedding (CLS first) to ``1 + new_num_patches`` tokens.

    The patch positions are laid out on their square grid and resized bicubically (as
    LAVIS's ``interpolate_pos_embed`` does for 224 -> 364 px); the CLS position is kept.
    The same size returns the input unchanged.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(
            f"position embedding must have shape [1, 1 + num_patches, dim], got {tuple(pos_embed.shape)}"
        )
    old_num_patches = pos_embed.shape[1] - 1
    if old_num_patches == new_num_patches:
        return pos_embed
    old_side, new_side = math.isqrt(old_num_patches), math.isqrt(new_num_patches)
    if old_side * old_side != old_num_patches or new_side * new_side != new_num_patches:
        raise ValueError(
            f"cannot interpolate position embedding from {old_num_patches} to {new_num_patches} patches: "
            "both must be square grids"
        )
    dim = pos_embed.shape[-1]
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    grid = patch_pos.float().reshape(1, old_side, old_side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, new_num_patches, dim).to(pos_embed.dtype)
    logger.info(
        "interpolated position embedding from %dx%d to %dx%d patches", old_side, old_side, new_side, new_side
    )
    return torch.cat([cls_pos, patch_pos], dim=1)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a whole residual branch per sample, rescale the survivors."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    return x * mask / keep_prob


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


def _norm_in_own_dtype(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x.to(norm.weight.dtype))


class VisionEmbeddings(nn.Module):
    """Patch embedding + CLS token + absolute position embedding (HF ``Blip2VisionEmbeddings`` names)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        # CLIP's patch convolution has no bias; EVA's has one.
        self.patch_embedding = nn.Conv2d(
            3,
            cfg.hidden_size,
            kernel_size=cfg.patch_size,
            stride=cfg.patch_size,
            bias=cfg.arch != "clip_vit_l",
        )
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_positions, cfg.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if (height, width) != (self.image_size, self.image_size):
            raise ValueError(
                f"image is {height}x{width} px but the vision encoder is built for "
                f"{self.image_size}x{self.image_size}; "
                "set model.vision.image_size (position embeddings of other sizes are resized when weights load)"
            )
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype)).flatten(2).transpose(1, 2)
        # The residual stream lives in the position embedding's dtype (fp32 for a frozen
        # half-precision ViT, as under LAVIS's autocast).
        stream_dtype = self.position_embedding.dtype
        cls = self.class_embedding.to(stream_dtype).expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches.to(stream_dtype)], dim=1) + self.position_embedding


class VisionAttention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (HF ``Blip2Attention`` names).

    EVA has biases for q and v only; HF stores them as one ``qkv.bias`` holding
    ``cat(q_bias, 0, v_bias)``. The key slice is held constant (no gradient), so it stays
    zero as in EVA while HF weights still load unchanged. CLIP trains all three biases.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.train_key_bias = cfg.arch == "clip_vit_l"
        self.qkv = cpu_linear.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = cpu_linear.Linear(cfg.hidden_size, cfg.hidden_size)

    def _qkv_bias(self) -> torch.Tensor | None:
        bias = self.qkv.bias
        if bias is None or self.train_key_bias:
            return bias
        d = self.hidden_size
        return torch.cat([bias[:d], bias[d : 2 * d].detach(), bias[2 * d :]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        weight = self.qkv.weight
        qkv = cpu_linear.linear(x.to(weight.dtype), weight, self._qkv_bias(), pack=False)
        q, k, v = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # The accelerator picks the kernel for this head size (EVA's 88 needs padding on Ascend).
        out = accelerator.attention_function(self.head_dim)(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(batch, tokens, self.hidden_size))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = cpu_linear.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = cpu_linear.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.activation = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(self.fc1(x.to(self.fc1.weight.dtype)))
        return self.fc2(x.to(self.fc2.weight.dtype))


class VisionLayer(nn.Module):
    """Pre-LayerNorm transformer block (HF ``Blip2EncoderLayer`` names) with stochastic depth."""

    def __init__(self, cfg: VisionConfig, drop_path_rate: float):
        super().__init__()
        self.self_attn = VisionAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(_norm_in_own_dtype(self.layer_norm1, x)).to(x.dtype)
        x = x + drop_path(attn, self.drop_path_rate, self.training)
        mlp = self.mlp(_norm_in_own_dtype(self.layer_norm2, x)).to(x.dtype)
        return x + drop_path(mlp, self.drop_path_rate, self.training)


class IndexedBlocks(nn.Module):
    """Some blocks of a stack, each named by its index in the whole stack (``"0"`` ... ``"38"``).

    A whole stack gives the state-dict names of an ``nn.ModuleList`` (``layers.{i}.*``); a
    pipeline stage holding blocks ``[a, b)`` gives those blocks the same names, so weights
    and checkpoints never depend on the layout. Iteration runs over the held blocks in order
    and ``blocks[i]`` is block ``i`` of the whole stack.
    """

    def __init__(self, blocks: dict[int, nn.Module]):
        super().__init__()
        for index in sorted(blocks):
            self.add_module(str(index), blocks[index])

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> nn.Module:
        return self._modules[str(index)]

    def indices(self) -> list[int]:
        return [int(name) for name in self._modules]

    def keep(self, start: int, end: int) -> None:
        """Drop every block outside ``[start, end)``."""
        for index in self.indices():
            if not start <= index < end:
                del self._modules[str(index)]


class VisionLayers(nn.Module):
    """The block stack (HF ``Blip2Encoder``: ``encoder.layers.{i}``), optionally checkpointed."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # Plain floats (not torch.linspace) so the module also builds on the meta device.
        rates = [cfg.drop_path_rate * i / max(cfg.num_layers - 1, 1) for i in range(cfg.num_layers)]
        self.layers = IndexedBlocks({index: VisionLayer(cfg, rate) for index, rate in enumerate(rates)})
        self.grad_checkpointing = cfg.grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False) if use_checkpoint else layer(x)
        return x


class VisionEncoder(nn.Module):
    """ViT image encoder followed by ``ln_vision`` (``post_layernorm``, fp32).

    ``forward(pixel_values [B, 3, S, S]) -> [B, 1 + (S/patch)^2, hidden]`` in fp32.
    After :func:`freeze_vision` the module stays in eval mode even when a parent calls
    ``.train()``.

    A pipeline stage holds part of it (:meth:`keep_parts`): without block 0 it has no
    embeddings and reads the previous blocks' hidden states; without ``post_layernorm``
    (kept by the stage of the Q-Former) it returns the raw residual stream.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.frozen = False
        self.embeddings = VisionEmbeddings(cfg)
        # CLIP ViT-L normalises the embeddings before the blocks; EVA does not.
        self.pre_layernorm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_layernorm else None
        )
        self.encoder = VisionLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """EVA's initialisation: truncated normal (std 0.02), zero biases, output layers scaled by depth."""
        if self.embeddings is not None:
            nn.init.trunc_normal_(self.embeddings.class_embedding, std=0.02)
            nn.init.trunc_normal_(self.embeddings.position_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for index in self.encoder.layers.indices():
            layer = self.encoder.layers[index]
            layer.self_attn.projection.weight.div_(math.sqrt(2.0 * (index + 1)))
            layer.mlp.fc2.weight.div_(math.sqrt(2.0 * (index + 1)))

    def keep_parts(self, blocks: tuple[int, int] | None, ln_vision: bool) -> None:
        """Keep only a pipeline stage's parts: ViT ``blocks`` ``[a, b)`` (block 0 brings the
        embeddings) and, with ``ln_vision``, ``post_layernorm``.

        The stage builds the whole encoder first and drops the rest, so every part starts
        from the same random weights in every layout (its draws come in the same order).
        """
        start, end = blocks if blocks is not None else (0, 0)
        if start > 0 or end == 0:
            self.embeddings = None
            self.pre_layernorm = None
        self.encoder.layers.keep(start, end)
        if not ln_vision:
            self.post_layernorm = None

    def train(self, mode: bool = True) -> VisionEncoder:
        # A frozen encoder never leaves eval mode (no dropout / drop path), as in LAVIS.
        return super().train(mode and not self.frozen)

    @property
    def reads_pixels(self) -> bool:
        """This (part of the) encoder starts from images, not from earlier blocks' hidden states."""
        return self.embeddings is not None

    def ln_vision(self, x: torch.Tensor) -> torch.Tensor:
        """``post_layernorm`` in fp32 whatever the dtype of the stream or of its weights."""
        norm = self.post_layernorm
        return F.layer_norm(
            x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Images (or, on a pipeline stage without block 0, earlier blocks' hidden states) ->
        ``ln_vision`` of the last block's output (without ``post_layernorm``: the raw stream)."""
        x = pixel_values
        if self.embeddings is not None:
            x = self.embeddings(x)
            if self.pre_layernorm is not None:
                x = _norm_in_own_dtype(self.pre_layernorm, x)
        x = self.encoder(x)
        return self.ln_vision(x) if self.post_layernorm is not None else x


def freeze_vision(module: VisionEncoder, dtype: torch.dtype = torch.float16) -> VisionEncoder:
    """Freeze a vision encoder as LAVIS does: no grads, eval mode for good, half Linear/Conv weights.

    Only Linear and Conv weights (and their biases) are converted to ``dtype``; LayerNorms,
    CLS and position embeddings stay in their dtype, so the residual stream and
    ``ln_vision`` keep full precision. Returns the module.
    """
    module.requires_grad_(False)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            sub.to(dtype)
    module.frozen = True
    module.eval()
    logger.info("vision encoder frozen (Linear/Conv weights in %s)", dtype)
    return module


def frozen_vision_dtype(cfg: VisionConfig) -> torch.dtype:
    """Weight dtype of a frozen ViT's Linear/Conv layers on this device: ``cfg.frozen_dtype``,
    but fp32 for fp16 on CPU (half-precision matmuls are slow or missing there)."""
    return accelerator.weight_dtype(cfg.frozen_dtype)
