"""Shared start-up and exit for the launch/ scripts: the package on the path, logging, a quicker start and end.

Every launch script imports this module first (``from _common import ...``), so importing
it is what makes ``blip2_megatron`` importable wherever the script is started.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_package_importable() -> None:
    """Put the repository root on ``sys.path`` when ``blip2_megatron`` is not installed.

    ``python launch/x.py`` and ``deepspeed launch/x.py`` put ``launch/`` first on the path,
    not the current directory, so a checkout that was never ``pip install``-ed (a fresh
    GPU machine) would fail at the first ``import blip2_megatron``. An installed package
    wins; the checkout is only the fallback. Spawned workers inherit ``sys.path``.
    """
    if importlib.util.find_spec("blip2_megatron") is None:
        sys.path.insert(0, str(REPO_ROOT))


ensure_package_importable()


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


# torch, DeepSpeed, megatron-core and transformers leave a few million objects that live as
# long as the process. Python's cyclic collector walks them again and again while they
# import and once more at exit: on a 2-core CPU about 1.5 s of a 13 s start and 2 s of
# the exit, paid by every rank of every launch. Objects moved to the collector's permanent
# generation (gc.freeze) are skipped by both; they are still freed by reference counting.


@contextlib.contextmanager
def importing_libraries() -> Iterator[None]:
    """Import the heavy libraries inside this block: no collection while they import."""
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def exit_with(code: int) -> NoReturn:
    """``sys.exit(code)`` without the collector's last pass over every live object.

    atexit handlers and the shutdown still run; only garbage cycles left at exit go
    uncollected, which the end of the process frees anyway.
    """
    gc.freeze()
    sys.exit(code)
