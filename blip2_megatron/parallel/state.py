"""Process groups: torch.distributed start-up and megatron-core's parallel_state.

megatron-core's ``parallel_state`` is the single source of truth for the TP / PP / DP
groups (ranks ordered tensor-fastest, then data, then pipeline). This module starts
torch.distributed from the launcher's environment (deepspeed, torchrun or srun) or, for a
plain single-process run, from a private TCP store on 127.0.0.1, and exposes the few
questions the rest of the package asks: ranks, sizes and groups.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from megatron.core import parallel_state

from blip2_megatron import accelerator
from blip2_megatron.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Rank information handed over by the launcher."""

    rank: int
    world_size: int
    local_rank: int


# The bound on every collective, set when torch.distributed starts (train.collective_timeout_s).
_collective_timeout = datetime.timedelta(seconds=600)


def launch_env() -> LaunchEnv:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (or SLURM's equivalents); defaults to one process."""
    env = os.environ
    rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    local_rank = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", 0)))
    return LaunchEnv(rank=rank, world_size=world_size, local_rank=local_rank)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Check that TP x PP divides the world size; return the data-parallel degree."""
    if tp < 1 or pp < 1:
        raise ConfigError(f"tensor/pipeline parallel sizes must be >= 1 (tp={tp}, pp={pp})")
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by tp x pp = {tp} x {pp}; "
            f"launch a multiple of {tp * pp} processes or change model.llm.tp / model.llm.pp"
        )
    return world_size // (tp * pp)


def init_distributed(timeout_s: float = 600) -> LaunchEnv:
    """Start torch.distributed (once) with the accelerator's backend; TF32 on GPU.

    ``timeout_s`` bounds every collective: a rank that waits longer for a lost peer fails
    instead of hanging the job.
    """
    global _collective_timeout
    env = launch_env()
    if dist.is_initialized():
        return env
    _collective_timeout = datetime.timedelta(seconds=timeout_s)
    accelerator.set_device(env.local_rank)
    # Every job process passes here: fp32 matmuls of fp32 jobs (and of the fp32 parts of
    # bf16 ones) run on TF32 tensor cores on GPU, as Megatron-LM's and LAVIS's users expect.
    accelerator.allow_tf32()
    backend = accelerator.communication_backend()
    timeout = _collective_timeout
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    elif env.world_size == 1:
        # A plain `python script.py`: a private rendezvous on loopback, published the way a
        # launcher would (DeepSpeed's engine insists on LOCAL_RANK).
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
        )
        dist.init_process_group(backend, rank=0, world_size=1, timeout=timeout)
    else:
        raise RuntimeError(
            f"WORLD_SIZE={env.world_size} but MASTER_ADDR/MASTER_PORT are not set; "
            "start the job with deepspeed, torchrun or srun"
        )
    if accelerator.is_cpu():
        _check_op_build_locks()
    # DeepSpeed keeps its own handle on the (already running) process group.
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    _release_shared_memory_buffer(env.rank)
    logger.info("torch.distributed up: rank %d/%d, backend %s", env.rank, env.world_size, backend)
    return env


#: DeepSpeed's CPU op builds in under a minute here; a build lock older than this was left by a killed build.
STALE_BUILD_LOCK_S = 300


def _check_op_build_locks() -> None:
    """Remove build locks that a killed build left behind; say so when a fresh one may hold us up.

    On the first CPU run DeepSpeed JIT-builds its communication op (``deepspeed_shm_comm``)
    under a lock file in torch's extension directory, and every other process waits for
    that file to go. A build killed midway leaves it, and every later run then waits forever
    in ``deepspeed.init_distributed``. A lock older than any build takes is removed here
    (this process then builds the op); a younger one is named in the log, in case no
    process is building any more.
    """
    from torch.utils.cpp_extension import get_default_build_root

    # torch builds op X in $TORCH_EXTENSIONS_DIR/X, or else in <its cache>/<python, device tag>/X.
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        locks = Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/lock")
    else:
        locks = Path(get_default_build_root()).glob("*/*/lock")
    for lock in locks:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the build finished meanwhile
            continue
        if age > STALE_BUILD_LOCK_S:
            logger.warning(
                "removing %s, a build lock left %.0f s ago by a build that did not finish", lock, age
            )
            lock.unlink(missing_ok=True)
        else:
            logger.warning(
                "%s exists (%.0f s old): DeepSpeed waits until the process building its CPU op removes "
                "it; if no such process runs (a build was killed), remove the file",
                lock,
                age,
            )


def _release_shared_memory_buffer(rank: int) -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm (CPU runs).

    DeepSpeed's CPU communication op creates a ~66 MB shared-memory file per rank when it
    starts (``deepspeed.init_distributed``) and never removes it, so every finished or
    killed CPU job left its files in /dev/shm, which is RAM, until the machine filled.
    Every rank maps its peers' files while it starts; after a barrier the names can go,
    and the memory is freed when the last process that maps it exits.
    """
    if not accelerator.is_cpu():
        return
    dist.barrier()
    uid, addr, port = os.getuid(), os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}")


def initialize_model_parallel(tp: int = 1, pp: int = 1) -> None:
    """Build megatron-core's TP/PP/DP groups over the running world (tensor fastest)."""
    if not dist.is_initialized():
        init_distributed()
    world = dist.get_world_size()
    validate_layout(world, tp, pp)
    if parallel_state.model_parallel_is_initialized():
        if (
            parallel_state.get_tensor_model_parallel_world_size() == tp
            and parallel_state.get_pipeline_model_parallel_world_size() == pp
        ):
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        order="tp-dp-pp",
        create_gloo_process_groups=False,
        # The same bound as the world group: a lost peer fails every group's collectives.
        distributed_timeout_minutes=_collective_timeout.total_seconds() / 60,
    )


def destroy() -> None:
    """Tear down the model-parallel groups and torch.distributed (tests, end of a job)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def tp_rank() -> int:
    return parallel_state.get_tensor_model_parallel_rank()


def tp_size() -> int:
    return parallel_state.get_tensor_model_parallel_world_size()


def tp_group() -> dist.ProcessGroup:
    return parallel_state.get_tensor_model_parallel_group()


def pp_rank() -> int:
    return parallel_state.get_pipeline_model_parallel_rank()


def pp_size() -> int:
    return parallel_state.get_pipeline_model_parallel_world_size()


def pp_group() -> dist.ProcessGroup:
    return parallel_state.get_pipeline_model_parallel_group()


def dp_rank() -> int:
    return parallel_state.get_data_parallel_rank()


def dp_size() -> int:
    return parallel_state.get_data_parallel_world_size()


def dp_group() -> dist.ProcessGroup:
    return parallel_state.get_data_parallel_group()


def is_initialized() -> bool:
    return parallel_state.model_parallel_is_initialized()


def embedding_group() -> dist.ProcessGroup | None:
    """The group of the first and last pipeline stage of this rank's pipeline (None when PP = 1).

    A head tied to the token embedding lives on both stages when PP > 1; its two copies
    are kept equal over this group (megatron-core builds it with the pipeline groups).
    """
    if pp_size() == 1 or not parallel_state.is_rank_in_embedding_group():
        return None
    return parallel_state.get_embedding_group()
