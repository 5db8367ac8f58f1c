"""Pipeline partition over the whole model: ViT blocks, bridge, decoder layers and head per stage.

The cut is the exact linear partition of the units' training FLOPs (checked against every
cut of small runs), balances the caption job within 1.25x at PP 2 and PP 4, keeps a trained
tied embedding on stage 0, and a model split with ViT blocks on two stages gives the whole
model's loss and gradients under the same names (stages chained in one process, handing
on what the pipeline engine sends). Multi-process parity: tests/test_parallel_training.py.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from blip2_megatron.config import build_model_config, load_job_config
from blip2_megatron.parallel.pipeline import PipelineStage, balanced_partition, stages_from_cuts

# The tiny model with a trained ViT of 4 blocks at 64 px: the ViT outweighs the rest, and
# at PP 2 its blocks land on both stages.
VIT_SPLIT = {
    "vision": {"freeze": False, "image_size": 64, "num_layers": 4},
    "llm": {"freeze": True},
    "qformer": {"hidden_dropout_prob": 0.0, "attention_dropout_prob": 0.0},
}


def _every_cut(costs: list[float], stages: int, first_min: int) -> list[list[int]]:
    n = len(costs)
    return [
        [*inner, n]
        for inner in itertools.combinations(range(1, n), stages - 1)
        if not inner or inner[0] >= first_min
    ]


def _stage_costs(costs: list[float], ends: list[int]) -> list[float]:
    starts = [0, *ends[:-1]]
    return [sum(costs[a:b]) for a, b in zip(starts, ends)]


def test_balanced_partition_is_the_best_cut():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 9)
        costs = [float(rng.choice([1, 2, 3, 5, 8])) for _ in range(n)]
        stages = rng.randint(1, n)
        first_min = rng.randint(1, n - stages + 1)
        ends = balanced_partition(costs, stages, first_min)
        assert len(ends) == stages and ends[-1] == n and ends[0] >= first_min
        best = min(max(_stage_costs(costs, cut)) for cut in _every_cut(costs, stages, first_min))
        assert max(_stage_costs(costs, ends)) == best, (costs, stages, ends)


def test_equal_units_split_evenly_with_the_remainder_early():
    assert balanced_partition([1.0] * 10, 3) == [4, 7, 10]
    assert balanced_partition([1.0] * 8, 4) == [2, 4, 6, 8]


def test_stages_from_cuts_name_each_part_once():
    # 3 ViT blocks, bridge, 4 layers, head: 9 units
    stages = stages_from_cuts(3, 4, [2, 5, 9])
    assert stages == [
        PipelineStage((0, 2), False, (0, 0), False),
        PipelineStage((2, 3), True, (0, 1), False),
        PipelineStage(None, False, (1, 4), True),
    ]
    assert stages[0].reads_image and not stages[1].reads_image and stages[1].holds_image_path
    assert not stages[0].holds_llm and stages[2].holds_llm
    assert [PipelineStage.from_json(s.to_json()) for s in stages] == stages
    assert stages_from_cuts(3, 4, [9]) == [PipelineStage.whole(3, 4)]
    with pytest.raises(ValueError, match="do not cut"):
        stages_from_cuts(3, 4, [5, 4, 9])


@pytest.mark.parametrize("pp", [2, 4])
def test_caption_job_stages_are_within_a_quarter(pp):
    """ViT-g trained at 364 px: stage 0 no longer carries the image path alone."""
    from blip2_megatron.models.flops import pipeline_partition, stage_train_flops

    cfg = load_job_config("caption_coco_opt2.7b").model
    stages = pipeline_partition(cfg, pp)
    flops = stage_train_flops(cfg, stages)
    assert max(flops) / min(flops) <= 1.25, flops
    assert sum(s.vision_blocks is not None for s in stages) >= 2  # the ViT spreads over stages
    # Every unit exactly once, in order.
    blocks = [b for s in stages if s.vision_blocks for b in range(*s.vision_blocks)]
    layers = [i for s in stages for i in range(*s.llm_layers)]
    assert blocks == list(range(39)) and layers == list(range(32))
    assert [s.has_bridge for s in stages].count(True) == 1 and stages[-1].has_head


def test_trained_tied_embedding_stays_on_the_first_stage():
    from blip2_megatron.models.flops import pipeline_partition

    frozen = pipeline_partition(build_model_config("tiny", VIT_SPLIT), 2)
    assert frozen[0].vision_blocks != (0, 4) and not frozen[0].has_bridge
    trained_llm = build_model_config("tiny", {**VIT_SPLIT, "llm": {"freeze": False}})
    assert trained_llm.llm.tie_word_embeddings
    stages = pipeline_partition(trained_llm, 2)
    assert stages[0].vision_blocks == (0, 4) and stages[0].has_bridge


def _run_stages(cfg, batch, pp: int) -> tuple[float, dict[str, torch.Tensor], list]:
    from blip2_megatron import accelerator
    from blip2_megatron.build import build_model, build_pipeline_stage

    accelerator.manual_seed(0)
    if pp == 1:
        model = build_model(cfg)
        model.train()
        loss = model(batch)["loss"]
        loss.backward()
        models = [model]
    else:
        stages = []
        for stage in range(pp):
            accelerator.manual_seed(0)  # as each rank seeds before it builds its stage
            stages.append(build_pipeline_stage(cfg, stage, pp))
        for stage in stages:
            stage.train()
        # What the engine hands each stage: float tensors as leaves needing a gradient.
        sent = (batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_slots"].long())
        outputs, received = [], []
        for stage in stages:
            inputs = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in sent)
            received.append(inputs)
            sent = stage(inputs)
            outputs.append(sent)
        loss = stages[-1].loss(outputs[-1], batch["labels"])
        loss.backward()
        # Backward stage by stage, as the engine does: each earlier stage's float outputs
        # receive the gradients of the next stage's inputs.
        for index in range(pp - 2, -1, -1):
            out = outputs[index]
            grads = [t.grad for t in received[index + 1] if t.is_floating_point()]
            floats = [t for t in out if t.is_floating_point()]
            assert all(g is not None for g in grads)
            torch.autograd.backward(floats, grads)
        models = [stage.model for stage in stages]
    grads = {
        name: p.grad.clone()
        for model in models
        for name, p in model.named_parameters()
        if p.requires_grad and p.grad is not None
    }
    return loss.item(), grads, [getattr(m, "stage", None) for m in models]


@pytest.mark.parametrize(
    "overrides",
    [VIT_SPLIT, {**VIT_SPLIT, "vision": {**VIT_SPLIT["vision"], "freeze": True, "image_size": 128}}],
    ids=["trained-vit", "frozen-vit"],
)
def test_vit_blocks_on_two_stages_give_the_whole_model_loss_and_gradients(single_process_group, overrides):
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.models.flops import pipeline_partition

    cfg = build_model_config("tiny", overrides)
    partition = pipeline_partition(cfg, 2)
    assert partition[0].vision_blocks is not None and partition[1].holds_image_path, partition
    gen = torch.Generator().manual_seed(0)
    size = cfg.vision.image_size
    batch = build_batch_builder(cfg)(
        {
            "image": torch.randn(3, 3, size, size, generator=gen),
            "text_input": ["a dot", "two red squares", "a cat"],
        }
    )
    whole_loss, whole_grads, _ = _run_stages(cfg, batch, 1)
    split_loss, split_grads, _ = _run_stages(cfg, batch, 2)
    assert split_loss == pytest.approx(whole_loss, rel=1e-5)
    # The same trained parameters, under the same (whole-model) names, with the same gradients.
    assert sorted(split_grads) == sorted(whole_grads)
    for name, grad in whole_grads.items():
        torch.testing.assert_close(split_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if cfg.vision.freeze:
        assert not any("visual_encoder" in name for name in whole_grads)


def test_stage_of_follows_the_partition():
    from blip2_megatron.parallel.pipeline import stage_of

    stages = stages_from_cuts(4, 4, [3, 10])  # blocks 0-2 | block 3, bridge, layers, head
    vit = "query_encoder.visual_encoder."
    assert stage_of(vit + "embeddings.patch_embedding.weight", stages) == 0
    assert stage_of(vit + "encoder.layers.2.mlp.fc1.weight", stages) == 0
    assert stage_of(vit + "encoder.layers.3.mlp.fc1.weight", stages) == 1
    assert stage_of(vit + "post_layernorm.weight", stages) == 1
    assert stage_of("query_encoder.qformer.layers.0.output.dense.weight", stages) == 1
    assert stage_of("language_projection.weight", stages) == 1
    assert stage_of("language_model.embed_tokens.weight", stages) == 1
    assert stage_of("language_model.layers.3.mlp.fc1.weight", stages) == 1
    assert stage_of("language_model.lm_head.weight", stages) == 1


def test_a_stage_of_frozen_vit_blocks_hands_the_optimizer_only_placeholders(single_process_group):
    """Frozen ViT blocks on a stage are no optimizer state; its placeholders keep DeepSpeed's groups."""
    from blip2_megatron.build import build_pipeline_stage
    from blip2_megatron.config import TrainConfig
    from blip2_megatron.training.optim import build_optimizer

    cfg = build_model_config(
        "tiny", {**VIT_SPLIT, "vision": {**VIT_SPLIT["vision"], "freeze": True, "image_size": 128}}
    )
    stage = build_pipeline_stage(cfg, 0, 2)
    assert stage.model.stage.vision_blocks is not None and not stage.model.stage.has_bridge
    optimised = {
        id(p) for group in build_optimizer(stage, TrainConfig()).param_groups for p in group["params"]
    }
    assert optimised == {id(p) for p in stage.placeholders}
    assert not any(p.requires_grad for p in stage.model.parameters())
