"""A DeepSpeed CPU op build killed midway must not make every later run wait forever.

torch builds an op under a lock file (``FileBaton``: created with ``O_EXCL`` and held open
until the build ends) and every other process waits for the file to go. The lock of a build
that was killed stays; ``parallel.state._check_op_build_locks`` removes it at start-up when
no process holds it, and leaves (and names) the lock of a build still running.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from journeys import LAUNCH, REPO, env
from torch.utils.file_baton import FileBaton

from blip2_megatron.parallel import state

# A build as torch runs it: take the baton, report, then hold it until stdin says "release"
# (or, with "die", exit without releasing, as a build killed midway does).
BUILDER = """
import sys
from torch.utils.file_baton import FileBaton
baton = FileBaton(sys.argv[1])
assert baton.try_acquire()
print("building", flush=True)
if sys.argv[2] == "hold":
    sys.stdin.readline()
    baton.release()
"""


def _builder(lock: Path, mode: str) -> subprocess.Popen:
    lock.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(lock), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "building"
    return proc


def _left_by_killed_build(lock: Path) -> None:
    proc = _builder(lock, "die")
    assert proc.wait(timeout=60) == 0 and lock.exists()


@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_lock_of_a_dead_build_is_removed_whatever_its_age(extensions_dir, caplog):
    lock = extensions_dir / "deepspeed_shm_comm" / "lock"
    _left_by_killed_build(lock)  # seconds old: the age rule alone would keep it
    with caplog.at_level(logging.WARNING):
        state._check_op_build_locks()
    assert not lock.exists()
    assert f"removing {lock}" in caplog.text and "no process holds it" in caplog.text


def test_lock_of_a_live_build_is_kept_named_and_waited_for(extensions_dir, caplog):
    lock = extensions_dir / "deepspeed_shm_comm" / "lock"
    builder = _builder(lock, "hold")
    try:
        with caplog.at_level(logging.WARNING):
            state._check_op_build_locks()
        assert lock.exists()
        assert f"{lock} is held by process {builder.pid}" in caplog.text and "waiting" in caplog.text
        # What DeepSpeed then does (torch's baton): wait until the builder removes the lock.
        waiter = threading.Thread(target=FileBaton(str(lock)).wait)
        waiter.start()
        assert lock.exists()
        builder.stdin.write("release\n")
        builder.stdin.flush()
        waiter.join(timeout=60)
        assert not waiter.is_alive() and not lock.exists()
    finally:
        builder.kill()
        builder.wait()


@pytest.mark.parametrize("blind_spot", ["network file system", "no /proc"])
def test_where_builders_may_be_unseen_only_an_old_lock_is_removed(
    blind_spot, extensions_dir, monkeypatch, caplog
):
    """On a shared file system another host may be building; without /proc nobody can tell."""
    if blind_spot == "network file system":
        monkeypatch.setattr(state, "_filesystem_type", lambda path: "nfs4")
    else:
        monkeypatch.setattr(state, "_build_lock_holders", lambda lock: None)
    old, young = extensions_dir / "deepspeed_shm_comm" / "lock", extensions_dir / "other_op" / "lock"
    for lock in (old, young):
        _left_by_killed_build(lock)
    left_at = time.time() - state.STALE_BUILD_LOCK_S - 60
    os.utime(old, (left_at, left_at))
    with caplog.at_level(logging.WARNING):
        state._check_op_build_locks()
    assert not old.exists() and young.exists()
    assert f"removing {old}" in caplog.text and f"{young} exists" in caplog.text


def test_filesystem_type_is_the_innermost_mount():
    assert state._filesystem_type(Path("/proc/self/status")) == "proc"
    assert state._filesystem_type(Path("/")) is not None


@pytest.mark.slow
def test_training_starts_after_an_interrupted_first_build(tmp_path, sample):
    """The user's case: the first run was killed while building; the next run trains."""
    from torch.utils.cpp_extension import get_default_build_root

    extensions = tmp_path / "torch_extensions"
    # The op as an earlier run built it (if one did: else this run builds it, which takes longer).
    built = sorted(Path(get_default_build_root()).glob("*_cpu/deepspeed_shm_comm/*.so"))
    if built:
        shutil.copytree(
            built[0].parent, extensions / "deepspeed_shm_comm", ignore=shutil.ignore_patterns("lock")
        )
    lock = extensions / "deepspeed_shm_comm" / "lock"
    _left_by_killed_build(lock)
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(LAUNCH / "train.py"),
            f"data.sample_root={sample.root}",
            f"train.output_dir={run}",
            "train.max_steps=2",
            "train.log_interval=1",
            "eval.enabled=false",
        ],
        env=env(TORCH_EXTENSIONS_DIR=str(extensions)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=420,  # a run that waits on the lock never ends
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"removing {lock}" in proc.stderr and (run / "summary.json").exists(), proc.stderr[-4000:]
    assert not lock.exists()
