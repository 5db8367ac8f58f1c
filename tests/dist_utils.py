"""Run a test function in N gloo processes on this machine (CPU) and collect results."""

from __future__ import annotations

import gc
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from blip2_megatron.parallel.state import free_port


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    from blip2_megatron.parallel import state

    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        state.init_distributed(timeout_s=180)
        result = fn(rank, world_size, *args)
        path.write_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # noqa: BLE001 - reported to the parent test
        path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise
    finally:
        state.destroy()
        gc.freeze()  # the process ends here: spare it the collector's ~2 s pass over the libraries


def launcher_free_env(**extra: str) -> dict[str, str]:
    """This process's environment for a CPU subprocess, without any launcher's rank variables."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` processes; return results by rank.

    ``fn`` must be importable (a module-level function). Each process has torch.distributed
    started on gloo; megatron-core groups are left to ``fn``.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), fn, args, out_dir),
                nprocs=world_size,
                start_method="spawn",
            )
        except mp.ProcessRaisedException:
            pass  # the per-rank traceback below is more useful
        results = []
        for rank in range(world_size):
            path = Path(out_dir) / f"rank{rank}.pkl"
            if not path.exists():
                raise RuntimeError(f"rank {rank} produced no result")
            status, value = pickle.loads(path.read_bytes())
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            results.append(value)
        return results
