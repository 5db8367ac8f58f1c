"""The image path split over tensor-parallel ranks: each encodes 1/TP of the images.

Every TP rank of a data-parallel rank reads the same batch, and the LLM needs all of its
image features on every TP rank. The ViT and Q-Former are replicated, not split by
tensor parallelism, so if each TP rank encoded the whole batch, TP - 1 of every TP
ranks' image work would be redundant (with a ViT-g trained at 364 px, ~85% of a caption
fine-tuning step). Instead (DESIGN.md, "Parallelism"):

* :func:`rows_of_this_rank` picks this TP rank's ``ceil(B / TP)`` images (the train
  loader decodes only those: :func:`loader_image_rows`);
* :func:`gather_rows` all-gathers the encoded rows over the TP group; its backward hands
  each rank the gradient of its own rows (the LLM after the gather is tensor-parallel
  with replicated activations, so every rank holds the same full gradient there);
* :func:`sum_gradients_over_tp` makes each replicated image-path parameter's gradient the
  sum over TP ranks (a hook on the parameter, before the gradient is accumulated, so that
  DeepSpeed's own reduction over data-parallel ranks, hooked or not, sees the whole
  batch's gradient): the gradient is reduced over DP x TP, as one rank with the whole
  batch would compute it.

When B does not divide by TP, the last rank's rows past the end repeat the last image;
their outputs are dropped after the gather, so they get no gradient. The encoding runs in
:func:`own_random_stream`, so the TP ranks' dropout masks differ as their images do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config
from blip2_megatron.data.batch import image_rows
from blip2_megatron.parallel import state


def rows_of_this_rank(images: torch.Tensor, batch: int) -> torch.Tensor:
    """This TP rank's ``ceil(B / TP)`` images of a batch of ``batch`` (B along dim 0).

    ``images`` holds the whole batch's images, or already only this rank's rows (as the
    train loader decodes them); both give the same rows.
    """
    rows = image_rows(batch, state.tp_rank(), state.tp_size())
    if images.shape[0] == len(rows):  # decoded for this rank (with B = 1 both readings agree)
        return images
    if images.shape[0] != batch:
        raise ValueError(
            f"a batch of {batch} holds {images.shape[0]} images: neither all of them nor TP rank "
            f"{state.tp_rank()}'s {len(rows)}"
        )
    return images.index_select(0, torch.tensor(rows, device=images.device))


def splits_images(cfg: Blip2Config) -> bool:
    """Whether the image path is split over TP ranks (on the stage that holds it)."""
    return cfg.tp_split_images and state.tp_size() > 1


def loader_image_rows(cfg: Blip2Config, batch_size: int) -> list[int] | None:
    """The rows of each training batch whose images this rank encodes (None: all of them).

    What the train loader decodes: a pipeline stage after the first encodes no image, and
    with the image path split over TP ranks each encodes :func:`rows_of_this_rank`.
    """
    if cfg.llm is None:  # stage 1: no LLM to split
        return None
    if state.pp_rank() > 0:
        return []
    if splits_images(cfg):
        return image_rows(batch_size, state.tp_rank(), state.tp_size())
    return None


class _GatherRows(torch.autograd.Function):
    """All-gather equal row blocks over the TP group, keep the first ``batch`` rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, batch: int) -> torch.Tensor:
        group = state.tp_group()
        ctx.per_rank = local.shape[0]
        ctx.rank = state.tp_rank()
        blocks = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(blocks, local.contiguous(), group=group)
        return torch.cat(blocks)[:batch]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        start = ctx.rank * ctx.per_rank
        own = grad[start : start + ctx.per_rank]
        if own.shape[0] < ctx.per_rank:  # rows past the end of the batch: dropped, no gradient
            padding = grad.new_zeros((ctx.per_rank - own.shape[0], *grad.shape[1:]))
            own = torch.cat([own, padding])
        return own.contiguous(), None


def gather_rows(local: torch.Tensor, batch: int) -> torch.Tensor:
    """The whole batch's ``batch`` rows on every TP rank from each rank's :func:`rows_of_this_rank` output."""
    return _GatherRows.apply(local, batch)


def sum_gradients_over_tp(parameters: Iterable[nn.Parameter]) -> None:
    """From now on each of these (replicated, trained) parameters' gradients is summed over the TP group."""
    group = state.tp_group()

    def all_reduce(grad: torch.Tensor) -> torch.Tensor:
        # A copy: autograd may hand the same tensor to another input too (``x + pos_embed``).
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=group)
        return grad

    for param in parameters:
        if param.requires_grad:
            param.register_hook(all_reduce)


@contextlib.contextmanager
def own_random_stream() -> Iterator[None]:
    """Inside, a random stream of this TP rank's own, seeded from the stream TP ranks share.

    The TP ranks of one DP rank share a random stream (replicated modules must draw the same
    dropout). Encoding different images they must not: the same Q-Former dropout masks would
    fall on each rank's first image. One draw from the shared stream (the same on every TP
    rank, so they stay in step) seeds a stream offset by the TP rank for what runs inside;
    afterwards the shared stream continues from that draw.
    """
    seed = int(torch.randint(0, 2**62, (1,)))
    cpu_state, device_state = torch.get_rng_state(), accelerator.rng_state()
    accelerator.manual_seed(seed + state.tp_rank())
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        accelerator.set_rng_state(device_state)
