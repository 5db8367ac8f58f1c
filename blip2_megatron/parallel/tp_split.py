"""The image path split over tensor-parallel ranks: each encodes 1/TP of the images.

Every TP rank of a data-parallel rank reads the same batch, and the LLM needs all of its
image features on every TP rank. The ViT and Q-Former are replicated, not split by
tensor parallelism, so if each TP rank encoded the whole batch, TP - 1 of every TP
ranks' image work would be redundant (with a ViT-g trained at 364 px, ~85% of a caption
fine-tuning step). Instead (docs/design.md, "Parallel layout"):

* :func:`rows_of_this_rank` picks this TP rank's ``ceil(B / TP)`` images (the train
  loader decodes only those: :func:`loader_image_rows`);
* :func:`gather_rows` all-gathers the encoded rows over the TP group; its backward hands
  each rank the gradient of its own rows (the LLM after the gather is tensor-parallel
  with replicated activations, so every rank holds the same full gradient there);
* :func:`sum_gradients_over_tp` makes each replicated image-path parameter's gradient the
  sum over TP ranks, in a few flat buckets per backward (:class:`TpGradientSum`), before
  DeepSpeed's own reduction over data-parallel ranks, hooked or not, reads it, so that it
  sees the whole batch's gradient: the gradient is reduced over DP x TP, as one rank with
  the whole batch would compute it.

When B does not divide by TP, the last rank's rows past the end repeat the last image;
their outputs are dropped after the gather, so they get no gradient. The encoding runs in
:func:`own_random_stream`, so the TP ranks' dropout masks differ as their images do.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config
from blip2_megatron.data.batch import image_rows
from blip2_megatron.parallel import state

logger = logging.getLogger(__name__)


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


# DDP's order of magnitude: large enough that a bucket's all-reduce runs at link bandwidth,
# small enough that several overlap with the backward of the blocks before them.
TP_GRADIENT_BUCKET_BYTES = 50 * 2**20


class _Bucket:
    """Parameters whose gradients are summed over TP in one all-reduce, and this backward's state."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.offsets: dict[nn.Parameter, int] = {}
        numel = 0
        for param in params:
            self.offsets[param] = numel
            numel += param.numel()
        self.numel = numel
        self.expected = 0  # parameters that receive a gradient in this backward
        self.arrived: list[nn.Parameter] = []
        self.buffer: torch.Tensor | None = None
        self.work: dist.Work | None = None

    def slot(self, param: nn.Parameter) -> torch.Tensor:
        start = self.offsets[param]
        return self.buffer[start : start + param.numel()].view_as(param)


class TpGradientSum:
    """Sums replicated parameters' gradients over the TP group in a few flat buckets per backward.

    Why not one all-reduce per parameter: the image path of ViT-g + Q-Former has ~730 trained
    tensors, and as many small collectives per micro-batch, each in line with compute, cost
    latency that one ~50 MB bucket does not. The buckets follow the backward order (reverse
    of registration) and are all-reduced asynchronously as soon as each is complete, in
    bucket order on every rank (so the collectives match across ranks): bucket k's
    reduction overlaps the backward that fills bucket k + 1, whose launch waits for it
    (on NCCL/HCCL the wait orders the compute stream after it; the host does not block).
    ZeRO-3 is not handled (its parameters hold no local values); the config refuses it with TP.

    Ordering with DeepSpeed. ZeRO-1/2 (and DeepSpeed's bf16 optimizer) read each
    gradient in a post-accumulate-grad hook as soon as autograd has accumulated it, long
    before a bucket holding it can be complete. So hooks registered on these parameters
    *after* this object (DeepSpeed registers its own while its engine is set up, after
    the model is built) are held here and run for a parameter once its gradient is
    summed: DeepSpeed still sees each gradient exactly once, in the same backward, only
    later, and overlaps its DP reduction with the rest of the backward as before. All held
    hooks run before the backward returns (after the last bucket in the backward waits),
    so ZeRO-0 and the pipeline engine, which reduce over DP after backward, see summed
    gradients too.

    Gradient accumulation: a parameter's earlier micro-batches' (already summed) gradient
    is set aside before autograd accumulates this micro-batch's, so only the new gradient
    is summed, then added to it. Autograd's own accumulation never hands us a tensor that
    it also passes to another input (it copies instead of taking such a gradient), and the
    gradient is changed only in the post-accumulate hook, where it belongs to the parameter.

    Bucket buffers are made on the gradients' device and dtype when the first gradient of a
    bucket arrives (NCCL/HCCL take device tensors only), and freed once the bucket is done.
    The bucket layout is planned from the parameters' dtype and device at each backward,
    since DeepSpeed casts parameters after this object is created.
    """

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        group: dist.ProcessGroup | None,
        bucket_bytes: int = TP_GRADIENT_BUCKET_BYTES,
    ):
        self.group = group
        self.bucket_bytes = bucket_bytes
        unique = {id(p): p for p in parameters if p.requires_grad}
        self.params: list[nn.Parameter] = list(reversed(unique.values()))  # backward order
        self.held_hooks: dict[nn.Parameter, dict[int, Callable[[nn.Parameter], None]]] = {}
        self.layout: tuple | None = None
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, _Bucket] = {}
        self.graph_task = -1
        self.receiving: set[nn.Parameter] = set()  # those that get a gradient in this backward
        self.set_aside: dict[nn.Parameter, torch.Tensor] = {}
        self.next_to_launch = 0
        self.launched: list[_Bucket] = []
        for param in self.params:
            self.held_hooks[param] = collections.OrderedDict()  # weakly referable, as handles need
            param.register_hook(self._before_accumulation(param))
            param.register_post_accumulate_grad_hook(self._after_accumulation)
            # Hooks registered from now on (DeepSpeed's) wait until the gradient is summed.
            param.register_post_accumulate_grad_hook = functools.partial(self._hold_hook, param)

    # -------------------------------------------------------------------- hooks
    def _hold_hook(self, param: nn.Parameter, hook: Callable[[nn.Parameter], None]) -> RemovableHandle:
        handle = RemovableHandle(self.held_hooks[param])
        self.held_hooks[param][handle.id] = hook
        return handle

    def _before_accumulation(self, param: nn.Parameter) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self._begin_backward_if_new()
            if param in self.receiving and param.grad is not None:
                # earlier micro-batches' gradient, summed already: autograd starts afresh
                self.set_aside[param] = param.grad
                param.grad = None

        return hook

    def _after_accumulation(self, param: nn.Parameter) -> None:
        bucket = self.bucket_of[param]
        if bucket.buffer is None:
            bucket.buffer = torch.empty(bucket.numel, dtype=param.grad.dtype, device=param.grad.device)
        bucket.slot(param).copy_(param.grad)
        bucket.arrived.append(param)
        self._launch_complete_buckets()

    # ------------------------------------------------------------------ buckets
    def _begin_backward_if_new(self) -> None:
        """At the first hook of a backward: plan the buckets, count the gradients each expects."""
        graph_task = torch._C._current_graph_task_id()
        if graph_task == self.graph_task:
            return
        if self.launched or any(b.arrived for b in self.buckets):
            # The last backward stopped part-way (an exception): its gradients are lost anyway.
            logger.warning("a backward began before the last one finished summing its gradients over TP")
            self._drop_unfinished()
        self.graph_task = graph_task
        layout = tuple((p.dtype, p.device) for p in self.params)
        if layout != self.layout:
            self._plan(layout)
        self.receiving = {p for p in self.params if _receives_gradient(p)}
        for bucket in self.buckets:
            bucket.expected = sum(p in self.receiving for p in bucket.params)
        self.next_to_launch = 0

    def _drop_unfinished(self) -> None:
        for bucket in self.launched:
            bucket.work.wait()  # the other TP ranks take part in it
        for param, earlier in self.set_aside.items():
            param.grad = earlier
        for bucket in self.buckets:
            bucket.arrived, bucket.buffer, bucket.work = [], None, None
        self.launched, self.set_aside = [], {}

    def _plan(self, layout: tuple) -> None:
        self.layout = layout
        self.buckets, open_buckets = [], {}
        for param, key in zip(self.params, layout):
            members, size = open_buckets.get(key, ([], 0))
            if members and size + param.numel() * param.element_size() > self.bucket_bytes:
                self.buckets.append(_Bucket(members))
                members, size = [], 0
            open_buckets[key] = ([*members, param], size + param.numel() * param.element_size())
        self.buckets.extend(_Bucket(members) for members, _ in open_buckets.values())
        self.bucket_of = {param: bucket for bucket in self.buckets for param in bucket.params}
        logger.debug("TP gradient sum: %d parameters in %d buckets", len(self.params), len(self.buckets))

    def _launch_complete_buckets(self) -> None:
        """All-reduce complete buckets in bucket order; finish the one before; at the end, all."""
        buckets = self.buckets
        while self.next_to_launch < len(buckets):
            bucket = buckets[self.next_to_launch]
            if len(bucket.arrived) < bucket.expected:
                return
            self.next_to_launch += 1
            if bucket.expected == 0:
                continue
            bucket.work = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)
            while len(self.launched) > 0:  # the one before overlapped this one's backward
                self._finish(self.launched.pop(0))
            self.launched.append(bucket)
        # every bucket of this backward is launched: nothing is left to overlap with
        while self.launched:
            self._finish(self.launched.pop(0))

    def _finish(self, bucket: _Bucket) -> None:
        """Wait for the bucket's sum, hand it to its parameters and run their held hooks."""
        bucket.work.wait()
        for param in bucket.arrived:
            summed = bucket.slot(param)
            earlier = self.set_aside.pop(param, None)
            if earlier is None:
                param.grad.copy_(summed)
            else:
                param.grad = earlier.add_(summed)
            for hook in list(self.held_hooks[param].values()):
                hook(param)
        bucket.arrived, bucket.buffer, bucket.work = [], None, None


def _receives_gradient(param: nn.Parameter) -> bool:
    """Whether the running backward accumulates a gradient into ``param`` (as
    ``torch.autograd.graph.register_multi_grad_hook`` tells, without holding the gradients)."""
    if not param.requires_grad:
        return False
    with torch.enable_grad():
        node = torch.autograd.graph._get_grad_fn_or_grad_acc(param)
    return node is not None and torch._C._will_engine_execute_node(node)


def sum_gradients_over_tp(parameters: Iterable[nn.Parameter]) -> TpGradientSum:
    """From now on these (replicated, trained) parameters' gradients are summed over the TP group.

    In flat buckets, before any hook registered later (DeepSpeed's) reads them: see
    :class:`TpGradientSum`. Frozen parameters take no part.
    """
    return TpGradientSum(parameters, state.tp_group())


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
