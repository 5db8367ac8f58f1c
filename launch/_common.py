"""Shared start-up for the launch/ scripts: logging and the local-CPU default."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging() -> None:
    """INFO on global rank 0, warnings elsewhere; quiet the libraries' start-up chatter."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("DeepSpeed", "deepspeed", "megatron", "torch.distributed", "httpx", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
