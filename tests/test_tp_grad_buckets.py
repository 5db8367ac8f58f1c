"""The bucketed sum of replicated gradients over TP ranks (``tp_split.TpGradientSum``).

With the image path split over TP ranks each rank's replicated vision parameters see other
images, and their gradients must be summed over TP before DeepSpeed reduces them over DP:
in a few flat all-reduces per backward, not one per parameter. Checked on two gloo
processes at TP 2: the all-reduces issued per backward (one per bucket), the gradients
against a per-parameter all-reduce and against the replicated layout (every TP rank
encodes the whole batch) over two accumulated micro-batches, and that a hook registered
afterwards, as DeepSpeed ZeRO-1/2 registers its own, reads each gradient only once it is
summed. Loss parity over whole runs is ``test_parallel_training`` (tp2) and ``test_tp_split``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
from dist_utils import run_distributed

CAPTIONS = ["a red circle", "a small blue square at the top", "a dot", "a large green triangle"]


@contextlib.contextmanager
def _counted_all_reduces() -> Iterator[list[int]]:
    """Counts ``torch.distributed.all_reduce`` calls (the sizes they carry) while inside."""
    import torch.distributed as dist

    sizes: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        sizes.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield sizes
    finally:
        dist.all_reduce = original


def _toy_buckets(rank: int, world: int) -> dict:
    """A toy with a parameter used twice, an unused one and a frozen one, in several buckets."""
    import torch.distributed as dist

    from blip2_megatron.parallel.tp_split import TpGradientSum

    def toy() -> torch.nn.ModuleDict:
        torch.manual_seed(0)
        return torch.nn.ModuleDict(
            {
                "first": torch.nn.Linear(8, 16),
                "second": torch.nn.Linear(16, 16),
                "unused": torch.nn.Linear(4, 4),
                "frozen": torch.nn.Linear(16, 16).requires_grad_(False),
                "last": torch.nn.Linear(16, 2),
            }
        )

    def loss_of(model, inputs: torch.Tensor) -> torch.Tensor:
        hidden = model["first"](inputs)
        hidden = hidden + model["second"].bias  # the bias is used twice: autograd shares its gradient
        hidden = model["second"](torch.tanh(hidden)) + model["frozen"](hidden)
        return model["last"](hidden).square().mean()

    bucketed, reference = toy(), toy()
    # ~600 bytes: the trained 1,058 fp32 values (4.2 kB) fall into several buckets
    summer = TpGradientSum(bucketed.parameters(), group=None, bucket_bytes=600)
    seen_by_later_hook: dict[str, list[torch.Tensor]] = {}
    for name, param in bucketed.named_parameters():
        if param.requires_grad:
            seen_by_later_hook[name] = []
            param.register_post_accumulate_grad_hook(
                lambda p, n=name: seen_by_later_hook[n].append(p.grad.clone())
            )
    calls_per_backward = []
    for micro_batch in range(2):  # gradient accumulation: the second adds to the first's summed gradient
        inputs = torch.randn(5, 8, generator=torch.Generator().manual_seed(10 * micro_batch + rank))
        with _counted_all_reduces() as sizes:
            loss_of(bucketed, inputs).backward()
        calls_per_backward.append(len(sizes))
        reference.zero_grad()  # the reference: every gradient all-reduced by itself, accumulated by hand
        loss_of(reference, inputs).backward()
        for param in reference.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.summed = param.grad.clone() + getattr(param, "summed", 0)
    reference_grads = {n: getattr(p, "summed", None) for n, p in reference.named_parameters()}
    grads = dict(bucketed.named_parameters())
    used = [n for n, g in reference_grads.items() if g is not None]
    return {
        "calls_per_backward": calls_per_backward,
        "num_buckets_with_gradients": sum(b.expected > 0 for b in summer.buckets),
        "num_trained": len(summer.params),
        "used": used,
        "no_grad": sorted(n for n, p in grads.items() if p.grad is None),
        "different": [n for n in used if not torch.allclose(grads[n].grad, reference_grads[n], rtol=1e-6)],
        # what the later hook read at the end of the second backward: the whole accumulated sum
        "hook_different": [
            n for n in used if not torch.allclose(seen_by_later_hook[n][-1], reference_grads[n], rtol=1e-6)
        ],
        "hook_calls": {n: len(v) for n, v in seen_by_later_hook.items()},
    }


@pytest.mark.dist
def test_buckets_sum_like_one_all_reduce_per_parameter():
    results = run_distributed(_toy_buckets, 2)
    for result in results:
        assert result["num_buckets_with_gradients"] >= 3  # several buckets, overlapped in turn
        assert result["calls_per_backward"] == [result["num_buckets_with_gradients"]] * 2
        assert result["calls_per_backward"][0] < len(result["used"])
        assert result["no_grad"] == ["frozen.bias", "frozen.weight", "unused.bias", "unused.weight"]
        assert result["different"] == [] and result["hook_different"] == []
        # a later hook (DeepSpeed's) runs once per backward for each used parameter, never for unused ones
        assert result["hook_calls"] == {n: (2 if n in result["used"] else 0) for n in result["hook_calls"]}
    assert results[0]["used"] == results[1]["used"]


def _tiny_blip2(rank: int, world: int) -> dict:
    from blip2_megatron.build import build_model
    from blip2_megatron.config import build_model_config
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world, 1)
    base = build_model_config("tiny")
    results = {}
    for split in (True, False):
        cfg = dataclasses.replace(
            base,
            vision=dataclasses.replace(base.vision, freeze=False),
            llm=dataclasses.replace(base.llm, tp=2),
            tp_split_images=split,
        )
        torch.manual_seed(0)
        model = build_model(cfg, device="cpu")
        image_path = [*model.image_encoder.named_parameters(), *model.language_projection.named_parameters()]
        trained = {name: param for name, param in image_path if param.requires_grad}
        build = build_batch_builder(cfg)
        calls = []
        for micro_batch in range(2):
            gen = torch.Generator().manual_seed(1 + micro_batch)
            batch = build({"image": torch.randn(4, 3, 32, 32, generator=gen), "text_input": CAPTIONS})
            loss = model(batch)["loss"]
            with _counted_all_reduces() as sizes:
                loss.backward()
            calls.append(len(sizes))
        results[split] = (calls, {name: param.grad.clone() for name, param in trained.items()})
    (split_calls, split_grads), (replicated_calls, replicated_grads) = results[True], results[False]
    return {
        "num_trained": len(split_grads),
        "split_calls": split_calls,
        "replicated_calls": replicated_calls,
        # atol: the attention key biases' true gradient is zero (softmax ignores a shift): rounding noise
        "different": [
            n
            for n in split_grads
            if not torch.allclose(split_grads[n], replicated_grads[n], rtol=1e-5, atol=1e-8)
        ],
    }


@pytest.mark.dist
def test_tiny_blip2_sums_its_image_path_in_one_all_reduce_per_backward():
    """The tiny image path fits one bucket: one all-reduce per backward where there was one per tensor.

    Split over TP with two accumulated micro-batches, its gradients equal the replicated
    layout's, where every TP rank encodes the whole batch and no TP sum is needed. The
    backward's other all-reduces are the tensor-parallel LLM's, the same in both layouts.
    """
    results = run_distributed(_tiny_blip2, 2)
    for result in results:
        assert result["num_trained"] > 50
        extra = [s - r for s, r in zip(result["split_calls"], result["replicated_calls"])]
        assert extra == [1, 1], result
        assert result["different"] == [], result["different"]
    print("tiny BLIP-2 at TP 2:", results[0])
