"""The ``mpu`` object DeepSpeed asks for the model- and data-parallel groups.

It answers from megatron-core's parallel_state, so DeepSpeed's gradient all-reduce and
ZeRO partitioning run over exactly the data-parallel groups our tensor-parallel layers
were built against. "Model parallel" in DeepSpeed's vocabulary is our tensor-parallel
group (the pipeline engine brings its own grid; see parallel/pipeline.py).
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state


class MegatronMpu:
    """Adapter with the method names DeepSpeed calls on ``mpu``."""

    def get_model_parallel_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self) -> int:
        return parallel_state.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_tensor_model_parallel_group()

    def get_model_parallel_src_rank(self) -> int:
        return parallel_state.get_tensor_model_parallel_src_rank()

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_src_rank = get_model_parallel_src_rank

    def get_data_parallel_rank(self) -> int:
        return parallel_state.get_data_parallel_rank()

    def get_data_parallel_world_size(self) -> int:
        return parallel_state.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(parallel_state.get_data_parallel_group())

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()
