"""A DeepSpeed CPU op build killed midway must not make every later run wait forever."""

from __future__ import annotations

import logging
import os
import time

from blip2_megatron.parallel import state


def test_stale_build_lock_is_removed_and_a_fresh_one_named(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale, fresh = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "other_op" / "lock"
    for lock in (stale, fresh):
        lock.parent.mkdir()
        lock.touch()
    left_at = time.time() - state.STALE_BUILD_LOCK_S - 60
    os.utime(stale, (left_at, left_at))
    with caplog.at_level(logging.WARNING):
        state._check_op_build_locks()
    assert not stale.exists() and fresh.exists()
    assert f"removing {stale}" in caplog.text and f"{fresh} exists" in caplog.text
