"""Pipeline layout: what each stage holds, and DeepSpeed's grid checked against ours.

A BLIP-2 pipeline runs over units in forward order: the ViT blocks (block 0 with the patch
and position embedding), the *bridge* (``ln_vision``, the Q-Former or patch grouping, the
projection, the token embedding and the merge of the image features into the image slots),
the LLM's decoder layers, and the *head* (final norm, LM head and loss). Each stage holds a
contiguous run of them (:class:`PipelineStage`); :func:`balanced_partition` cuts the run so
that the costliest stage is as cheap as possible (``models/flops.py`` gives the costs).
Every layout-dependent reader (the model build, the engine, checkpoint layouts, resharding,
``launch/model_info.py``) takes the same list of stages.

DeepSpeed's pipeline engine builds its own process grid from
``PipeModelDataParallelTopology``; it must equal megatron-core's groups (which the
tensor-parallel layers use), and :func:`check_grid_matches_megatron` asserts that it does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state

from blip2_megatron.io import CheckpointMismatchError

# Stage costs are sums of floats taken in different orders: equal within this tolerance.
_COST_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PipelineStage:
    """What one pipeline stage holds, in forward order (a whole model is one stage holding all).

    A stage's inputs follow from it: the stage with ViT block 0 reads ``(image, input_ids,
    attention_mask, image_slots)``; a stage that starts inside the image path (ViT blocks
    from ``a > 0``, or the bridge alone) reads ``(vision_hidden, input_ids, attention_mask,
    image_slots)`` and, if it ends inside the ViT, sends the same 4-tuple on; after the
    bridge stages exchange ``(hidden_states, attention_mask)``.
    """

    vision_blocks: tuple[int, int] | None  # ViT blocks [start, end); None: no ViT block
    has_bridge: bool  # ln_vision, Q-Former / patch grouping, projection, token embedding, image merge
    llm_layers: tuple[int, int]  # decoder layers [start, end) (empty before the bridge)
    has_head: bool  # final norm, LM head and loss

    @classmethod
    def whole(cls, num_vision_blocks: int, num_llm_layers: int) -> PipelineStage:
        """The whole model as one stage (no pipeline)."""
        return cls((0, num_vision_blocks), True, (0, num_llm_layers), True)

    @property
    def reads_image(self) -> bool:
        """This stage starts the image path: it reads the images and holds the patch embedding."""
        return self.vision_blocks is not None and self.vision_blocks[0] == 0

    @property
    def holds_image_path(self) -> bool:
        """This stage holds some of the image path (ViT blocks or the bridge)."""
        return self.vision_blocks is not None or self.has_bridge

    @property
    def holds_llm(self) -> bool:
        """This stage holds some of the LLM (its embedding, decoder layers or head)."""
        return self.has_bridge or self.has_head or self.llm_layers[1] > self.llm_layers[0]

    def to_json(self) -> dict[str, Any]:
        return {
            "vision_blocks": list(self.vision_blocks) if self.vision_blocks is not None else None,
            "bridge": self.has_bridge,
            "llm_layers": list(self.llm_layers),
            "head": self.has_head,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PipelineStage:
        blocks = data["vision_blocks"]
        return cls(
            tuple(blocks) if blocks is not None else None,
            bool(data["bridge"]),
            tuple(data["llm_layers"]),
            bool(data["head"]),
        )


def stages_from_cuts(num_vision_blocks: int, num_llm_layers: int, ends: Sequence[int]) -> list[PipelineStage]:
    """The stages of a cut of the unit run ``[ViT blocks, bridge, LLM layers, head]`` at ``ends``.

    ``ends``: each stage's end (exclusive) as an index into the run, the last one its length.
    """
    v, layers = num_vision_blocks, num_llm_layers
    bridge, head = v, v + 1 + layers
    if list(ends) != sorted(set(ends)) or not ends or ends[0] <= 0 or ends[-1] != head + 1:
        raise ValueError(f"stage ends {list(ends)} do not cut a run of {head + 1} units")
    stages, start = [], 0
    for end in ends:
        blocks = (start, min(end, v)) if start < v else None
        llm_start = min(max(start - v - 1, 0), layers)
        llm_end = min(max(end - v - 1, 0), layers)
        stages.append(PipelineStage(blocks, start <= bridge < end, (llm_start, llm_end), end > head))
        start = end
    return stages


def balanced_partition(costs: Sequence[float], num_stages: int, first_stage_min_units: int = 1) -> list[int]:
    """Cut ``costs`` (per unit, in order) into ``num_stages`` contiguous non-empty stages; each stage's end.

    Exact linear partition (dynamic programming, units x stages is small): the costliest
    stage is as cheap as any cut allows; among those cuts the cheapest stage is as costly
    as possible (the smallest spread), and among those earlier stages take more units.
    ``first_stage_min_units``: the first stage holds at least this many units (a unit that
    must stay on stage 0).
    """
    n = len(costs)
    if not 1 <= num_stages <= n or not 1 <= first_stage_min_units <= n - num_stages + 1:
        raise ValueError(
            f"{n} units cannot fill {num_stages} pipeline stages with {first_stage_min_units} on the first"
        )
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)

    def cost(start: int, end: int) -> float:
        return prefix[end] - prefix[start]

    def first_ends(stages_left: int, start: int) -> range:
        """Possible ends of the stage starting at ``start`` with ``stages_left`` stages to fill (it included)."""
        low = max(start + 1, first_stage_min_units if start == 0 else 0)
        return range(low, n - stages_left + 2)

    # lowest[s][i]: the cheapest costliest stage cutting units [i, n) into s stages.
    lowest = [[math.inf] * (n + 1) for _ in range(num_stages + 1)]
    lowest[0][n] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(n - s, -1, -1):
            lowest[s][i] = min(
                (max(cost(i, end), lowest[s - 1][end]) for end in first_ends(s, i)), default=math.inf
            )
    ceiling = lowest[num_stages][0] * (1 + _COST_TOLERANCE)

    # highest_floor[s][i]: the costliest cheapest stage among cuts of [i, n) into s stages under the ceiling.
    highest_floor = [[-math.inf] * (n + 1) for _ in range(num_stages + 1)]
    highest_floor[0][n] = math.inf
    for s in range(1, num_stages + 1):
        for i in range(n - s, -1, -1):
            highest_floor[s][i] = max(
                (
                    min(cost(i, end), highest_floor[s - 1][end])
                    for end in first_ends(s, i)
                    if cost(i, end) <= ceiling
                ),
                default=-math.inf,
            )
    floor = highest_floor[num_stages][0] * (1 - _COST_TOLERANCE)

    # fits[s][i]: units [i, n) cut into s stages, each within [floor, ceiling].
    fits = [[False] * (n + 1) for _ in range(num_stages + 1)]
    fits[0][n] = True
    for s in range(1, num_stages + 1):
        for i in range(n - s, -1, -1):
            fits[s][i] = any(
                floor <= cost(i, end) <= ceiling and fits[s - 1][end] for end in first_ends(s, i)
            )
    ends, start = [], 0
    for s in range(num_stages, 0, -1):
        end = max(e for e in first_ends(s, start) if floor <= cost(start, e) <= ceiling and fits[s - 1][e])
        ends.append(end)
        start = end
    return ends


def check_grid_matches_megatron(topology: Any) -> None:
    """Assert DeepSpeed's pipe/data/model groups contain this rank with megatron-core's members."""
    rank = dist.get_rank()
    pairs = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
    }
    for axis, group in pairs.items():
        megatron_ranks = sorted(dist.get_process_group_ranks(group))
        deepspeed_ranks = next(sorted(r) for r in topology.get_axis_comm_lists(axis) if rank in r)
        if megatron_ranks != deepspeed_ranks:
            raise RuntimeError(
                f"DeepSpeed's {axis} group {deepspeed_ranks} differs from megatron-core's {megatron_ranks} on rank {rank}"
            )


# Whole-model parameter names that place a tensor on a stage (models/blip2.py's names).
LLM_LAYER_NAME = re.compile(r"^language_model\.layers\.(\d+)\.(.+)$")
_VISION_BLOCK_NAME = re.compile(r"^\w+\.visual_encoder\.encoder\.layers\.(\d+)\.")
_VISION_INPUT_NAME = re.compile(r"^\w+\.visual_encoder\.(embeddings|pre_layernorm)\.")


def stage_of(name: str, stages: list[PipelineStage]) -> int:
    """The pipeline stage (of ``stages``) that holds whole-model tensor ``name``.

    ViT block ``i`` lives with the stage holding it, the patch embedding with block 0;
    ``ln_vision``, the Q-Former, the projection and the token embeddings with the bridge;
    decoder layers with their stage; the final norm and head on the last stage.
    """
    match = LLM_LAYER_NAME.match(name)
    if match:
        index = int(match.group(1))
        for stage, parts in enumerate(stages):
            start, end = parts.llm_layers
            if start <= index < end:
                return stage
        raise CheckpointMismatchError(
            f"{name}: layer {index} is outside the model's {stages[-1].llm_layers[1]} layers"
        )
    match = _VISION_BLOCK_NAME.match(name)
    if match:
        index = int(match.group(1))
        for stage, parts in enumerate(stages):
            if parts.vision_blocks is not None and parts.vision_blocks[0] <= index < parts.vision_blocks[1]:
                return stage
        raise CheckpointMismatchError(f"{name}: ViT block {index} is outside the model's ViT blocks")
    if name.startswith(("language_model.norm.", "language_model.lm_head.")):
        return len(stages) - 1
    if _VISION_INPUT_NAME.match(name):
        return next(stage for stage, parts in enumerate(stages) if parts.reads_image)
    return next(stage for stage, parts in enumerate(stages) if parts.has_bridge)
