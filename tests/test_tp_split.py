"""The image path split over tensor-parallel ranks (``parallel/tp_split.py``).

At TP 2 each rank must encode only ceil(B / 2) images, and the loss and the gradient of
every image-path parameter (ViT trained here, Q-Former, queries, projection) must equal
those of the replicated layout, where every TP rank encodes the whole batch: the gathered
rows are the same and each replicated parameter's gradient is summed over the TP ranks.
Batches of 5 and 1 images do not divide by 2 (the last rank repeats an image whose output
is dropped). A batch holding only the rank's own images (what the train loader decodes
for it) gives exactly what the whole batch's images give. The layout journeys and ``test_parallel_training`` check TP 2 against one
process over whole training runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_utils import run_distributed

CAPTIONS = [
    "a red circle",
    "a small blue square at the top",
    "a dot",
    "a large green triangle",
    "two squares",
]


def _loss_grads_and_images(
    split: bool, batch_size: int, own_rows_only: bool = False
) -> tuple[float, dict[str, torch.Tensor], list[int]]:
    """``own_rows_only``: the batch holds only this TP rank's images, as the train loader decodes them."""
    from blip2_megatron.build import build_model
    from blip2_megatron.config import build_model_config
    from blip2_megatron.data.batch import build_batch_builder, image_rows
    from blip2_megatron.parallel import state

    cfg = build_model_config("tiny")
    cfg = dataclasses.replace(
        cfg,
        vision=dataclasses.replace(cfg.vision, freeze=False),
        llm=dataclasses.replace(cfg.llm, tp=2),
        tp_split_images=split,
    )
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu")
    encoded: list[int] = []
    model.image_encoder.visual_encoder.register_forward_pre_hook(
        lambda _, args: encoded.append(args[0].shape[0])
    )
    gen = torch.Generator().manual_seed(1)
    samples = {
        "image": torch.randn(batch_size, 3, 32, 32, generator=gen),
        "text_input": CAPTIONS[:batch_size],
    }
    batch = build_batch_builder(cfg)(samples)
    if own_rows_only:
        batch["image"] = batch["image"][image_rows(batch_size, state.tp_rank(), state.tp_size())]
    loss = model(batch)["loss"]
    loss.backward()
    image_path = [*model.image_encoder.named_parameters(), *model.language_projection.named_parameters()]
    grads = {name: param.grad.clone() for name, param in image_path if param.requires_grad}
    return float(loss.detach()), grads, encoded


def _compare(rank: int, world: int, batch_size: int) -> dict:
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world, 1)
    loss_split, grads_split, encoded_split = _loss_grads_and_images(True, batch_size)
    loss_own, grads_own, encoded_own = _loss_grads_and_images(True, batch_size, own_rows_only=True)
    loss_rep, grads_rep, encoded_rep = _loss_grads_and_images(False, batch_size)
    # atol: the attention key biases' true gradient is zero (softmax ignores a constant
    # shift); theirs is rounding noise of ~3e-10 in either layout.
    differ = [n for n in grads_rep if not torch.allclose(grads_split[n], grads_rep[n], rtol=1e-5, atol=1e-8)]
    return {
        "losses": (loss_split, loss_rep),
        "different_grads": differ,
        "num_grads": len(grads_rep),
        "zero_grads": sum(int(not g.any()) for g in grads_rep.values()),
        "encoded": (encoded_split, encoded_rep),
        "own_rows_same": loss_own == loss_split
        and encoded_own == encoded_split
        and all(torch.equal(grads_own[n], grads_split[n]) for n in grads_split),
    }


@pytest.mark.dist
@pytest.mark.parametrize("batch_size", [5, 1])
def test_each_tp_rank_encodes_its_share_and_gradients_equal_the_replicated_layout(batch_size):
    results = run_distributed(_compare, 2, batch_size)
    per_rank = -(-batch_size // 2)
    for result in results:
        loss_split, loss_rep = result["losses"]
        assert loss_split == pytest.approx(loss_rep, rel=1e-6)
        assert result["encoded"] == ([per_rank], [batch_size])
        assert result["num_grads"] > 50 and result["zero_grads"] == 0
        assert result["different_grads"] == [], result
        assert result["own_rows_same"]  # given only its rows, as the loader decodes them
    assert results[0]["losses"] == pytest.approx(results[1]["losses"], rel=1e-7)  # TP ranks agree


def _dropout_rows(rank: int, world: int) -> dict:
    from blip2_megatron.build import build_model
    from blip2_megatron.config import build_model_config
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(world, 1)
    cfg = build_model_config("tiny")
    cfg = dataclasses.replace(
        cfg,
        qformer=dataclasses.replace(cfg.qformer, hidden_dropout_prob=0.3),
        llm=dataclasses.replace(cfg.llm, tp=2),
    )
    torch.manual_seed(0)
    model = build_model(cfg, device="cpu").train()
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)).expand(2, -1, -1, -1)
    with torch.no_grad():
        rows = model.image_embeddings(image)  # rank 0 encodes the first copy, rank 1 the second
    return {
        "rows_equal": bool(torch.equal(rows[0], rows[1])),
        "next_draw": int(torch.randint(0, 2**30, (1,))),
    }


@pytest.mark.dist
def test_tp_ranks_draw_their_own_dropout_and_stay_in_step():
    """Two copies of one image, one per TP rank: Q-Former dropout differs, the shared stream agrees after."""
    results = run_distributed(_dropout_rows, 2)
    assert not results[0]["rows_equal"] and not results[1]["rows_equal"]
    assert results[0]["next_draw"] == results[1]["next_draw"]
