"""What a job does when something goes wrong at scale, and how it says so.

* A rank dies or hangs: the collective another rank is in fails (at once for a dead peer,
  after ``train.collective_timeout_s`` for a hung one). That rank logs which peers are gone
  (ranks on its own host are checked by process id, registered in the rendezvous store at
  start) and exits at once with :data:`EXIT_LOST_PEER`, without the clean shutdown that
  would wait for the lost peer; the launcher then stops the rest and exits non-zero.
* A checkpoint cannot be written (a full disk, a crash during the save): see
  ``training/checkpoint.py``; the job stops with :data:`EXIT_SAVE_FAILED` and the previous
  checkpoint and ``latest`` stay as they were.
* Non-finite losses: the step is skipped and counted (:class:`NonFiniteSteps`);
  ``train.max_bad_steps`` in a row stop the job with :data:`EXIT_NON_FINITE` after saving
  the last good state.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_LOST_PEER = 3  # another rank died or hung: this one stops without waiting for it
EXIT_SAVE_FAILED = 4  # a checkpoint could not be written (full disk, ...): stopped cleanly
EXIT_NON_FINITE = 5  # train.max_bad_steps non-finite steps in a row: stopped after saving

_STORE_PREFIX = "blip2/peer/"


class TrainingStopped(Exception):
    """The job stops on purpose, every rank together; ``exit_code`` says why."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no store (single process without a launcher): nothing to register
        return None


def register_peer() -> None:
    """Publish this rank's host and process id, so a survivor can tell which ranks are gone."""
    store = _store()
    if store is not None:
        store.set(f"{_STORE_PREFIX}{dist.get_rank()}", f"{socket.gethostname()}:{os.getpid()}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs. A killed rank stays a zombie until the launcher
    collects it, and a signal 0 still reaches a zombie: its state in /proc says it is gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():
        return True  # not Linux: the signal is all there is to go by
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # "pid (comm) S ..."
    except OSError:
        return False  # collected since the signal
    return state != "Z"


def describe_lost_peers() -> str:
    """Which ranks are gone, as far as this rank can tell."""
    store = _store()
    if store is None:
        return "peers unknown"
    host = socket.gethostname()
    lost, elsewhere = [], []
    try:
        for rank in range(dist.get_world_size()):
            peer_host, pid = store.get(f"{_STORE_PREFIX}{rank}").decode().rsplit(":", 1)
            if peer_host != host:
                elsewhere.append(f"{rank}@{peer_host}")
            elif not _alive(int(pid)):
                lost.append(f"{rank} (pid {pid})")
    except Exception:  # noqa: BLE001 - the store lives in rank 0's process: it may be the one lost
        return "rank 0, which holds the rendezvous store, is unreachable"
    parts = [f"lost rank(s) {', '.join(lost)}" if lost else "every rank on this host is alive"]
    if elsewhere:
        parts.append(f"ranks on other hosts not checked here: {', '.join(elsewhere)}")
    return "; ".join(parts)


def abort_rank(error: BaseException, phase: str, exit_code: int = EXIT_LOST_PEER) -> NoReturn:
    """Log why this rank stops and exit at once (a clean shutdown would wait for a lost peer)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    logger.error(
        "rank %d stops: %s failed (%s: %s); %s. Restart the job to resume from the last complete checkpoint.",
        rank,
        phase,
        type(error).__name__,
        message,
        describe_lost_peers(),
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


class NonFiniteSteps:
    """Counts skipped non-finite steps; stops the job after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, skipped: bool) -> bool:
        """Account for one step; True when the job must stop (``limit`` bad steps in a row)."""
        if not skipped:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.total += 1
        logger.warning(
            "step %d: non-finite loss, step skipped (%d in a row, %d in total; the job stops at %d in a row)",
            step,
            self.in_a_row,
            self.total,
            self.limit,
        )
        return self.in_a_row >= self.limit
