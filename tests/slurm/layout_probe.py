#!/usr/bin/env python
"""launch/train.py, after recording where each rank runs and which TP / DP / PP groups it is in.

Started instead of the trainer by launch/slurm/train.sbatch (``TRAIN_ENTRY`` pointing
here), so it goes through the same srun + torchrun path with the trainer's arguments. It
builds the process groups (``blip2_megatron.parallel.state``), writes
``<train.output_dir>/layout.json`` (rank 0, after gathering every rank's record) and one
line per rank to stdout::

    [layout] rank 2 local 0 on node2 (host node2): tp [2, 3] dp [0, 2] pp [2]

then runs launch/train.py in the same process. The trainer finds torch.distributed and
the model-parallel groups already built for its layout and keeps them, so the groups
recorded are the ones it trains with. The layout comes from the ``model.llm.tp=`` /
``model.llm.pp=`` overrides (1 when absent: the probe does not read the job YAML), the
collective timeout from ``train.collective_timeout_s=`` (600 s when absent).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import runpy
import socket
import sys
from pathlib import Path

TRAIN_SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "train.py"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ds_config", default=None, help="passed on to the trainer")
    parser.add_argument("--config", default=None, help="passed on to the trainer")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    values = dict(o.split("=", 1) for o in args.overrides if "=" in o)
    if "train.output_dir" not in values:
        parser.error("train.output_dir=... is required (train.sbatch passes it)")
    args.tp = int(values.get("model.llm.tp", 1))
    args.pp = int(values.get("model.llm.pp", 1))
    args.timeout_s = float(values.get("train.collective_timeout_s", 600))
    args.output_dir = Path(values["train.output_dir"])
    return args


@contextlib.contextmanager
def info_messages(logger_name: str):
    """The INFO (and above) messages ``logger_name`` logs meanwhile; the trainer's logging is not set up yet."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def record_layout(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from blip2_megatron.parallel import state

    with info_messages(state.__name__) as start_up:
        state.init_distributed(args.timeout_s)
    state.initialize_model_parallel(args.tp, args.pp)
    record = {
        "rank": dist.get_rank(),
        "local_rank": int(os.environ.get("LOCAL_RANK", -1)),
        "world_size": dist.get_world_size(),
        "slurm_node": os.environ.get("SLURMD_NODENAME"),
        "hostname": socket.gethostname(),
        "tp": dist.get_process_group_ranks(state.tp_group()),
        "dp": dist.get_process_group_ranks(state.dp_group()),
        "pp": dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group()),
        # The interface this rank's gloo groups bound to (set by state.init_distributed when unset).
        "gloo_ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
        "gloo_choice": next((m for m in start_up if m.startswith("gloo ")), None),
        "host_group": dist.get_process_group_ranks(state.host_group()),
    }
    print(
        f"[layout] rank {record['rank']} local {record['local_rank']} on {record['slurm_node']} "
        f"(host {record['hostname']}): tp {record['tp']} dp {record['dp']} pp {record['pp']}",
        flush=True,
    )
    # Gathering crosses the node boundary too: every rank's record reaches rank 0.
    records: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "layout.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    record_layout(parse_args(sys.argv[1:]))
    # launch/train.py as `python launch/train.py ARGS` would run it (it imports its
    # neighbour _common.py).
    sys.path.insert(0, str(TRAIN_SCRIPT.parent))
    sys.argv = [str(TRAIN_SCRIPT), *sys.argv[1:]]
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")
