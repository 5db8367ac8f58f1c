"""Pipeline layout: which decoder layers each stage holds, and DeepSpeed's grid checked against ours.

Stage 0 also holds the ViT, Q-Former, projection and token embeddings, and the last stage
the final norm, the head and the loss (``blip2_megatron.models.blip2.Blip2PipeStage``).
DeepSpeed's pipeline engine builds its own process grid from
``PipeModelDataParallelTopology``; it must equal megatron-core's groups (which the
tensor-parallel layers use), and :func:`check_grid_matches_megatron` asserts that it does.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from megatron.core import parallel_state


def balanced_layer_ranges(
    num_layers: int, num_stages: int, layer_cost: float, first_extra: float = 0.0, last_extra: float = 0.0
) -> list[tuple[int, int]]:
    """Decoder layers per stage minimising the costliest stage; every stage gets at least one.

    Each layer costs ``layer_cost``; the first stage also carries ``first_extra`` (BLIP-2's
    image path) and the last ``last_extra`` (the head). Among splits with the same largest
    stage the one with the smallest spread wins, then the one with more layers early: with
    no extras this is the even split, earlier stages taking the remainder.
    """
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"{num_layers} decoder layers cannot fill {num_stages} pipeline stages")
    if num_stages == 1:
        return [(0, num_layers)]
    best_key, best_counts = None, []
    # The first and last stages' layer counts are the free choices (they carry the extras);
    # the stages between share the rest as evenly as possible, earlier ones the remainder.
    # The first stage is tried from most layers down, so ties keep the layers early.
    middle = num_stages - 2
    for first in range(num_layers - num_stages + 1, 0, -1):
        for last in range(1, num_layers - first - middle + 1):
            rest = num_layers - first - last
            if (middle == 0 and rest) or rest < middle:
                continue
            base, extra = divmod(rest, middle) if middle else (0, 0)
            counts = [first, *[base + (1 if i < extra else 0) for i in range(middle)], last]
            costs = [n * layer_cost for n in counts]
            costs[0] += first_extra
            costs[-1] += last_extra
            key = (max(costs), max(costs) - min(costs))
            if best_key is None or key < best_key:
                best_key, best_counts = key, counts
    ranges, start = [], 0
    for count in best_counts:
        ranges.append((start, start + count))
        start += count
    return ranges


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
