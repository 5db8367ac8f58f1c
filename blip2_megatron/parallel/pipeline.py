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


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Decoder layers per stage, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
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
