import contextlib
import fcntl
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", module="megatron")

import pytest  # noqa: E402

# ----------------------------------------------------------------------------- two workers
# `python3 -m pytest` runs two test files at once (pyproject.toml: -n 2 --dist loadfile):
# most of the suite is subprocesses starting up (imports, the launcher, a JVM), which keep
# one of two cores busy. Files known to take longest are handed out first, so that no long
# file starts last. A test whose assertion bounds a time (a job ending within its collective
# timeout, a tool within its budget) is marked `alone`: it waits for the other worker's
# test (with its fixtures) to end and holds the other worker off until it is done.

LONGEST_FIRST = (
    "test_readme.py",
    "test_journey_layouts.py",
    "test_faults.py",
    "test_journey_chains.py",
    "test_slurm_multinode.py",
    "test_parallel_training.py",
    "test_collective_dtypes.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order and stay together


def _lock_files() -> tuple[Path, Path] | None:
    """The gate and turn lock files of this run's workers; None without workers."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if not run:
        return None
    base = Path(tempfile.gettempdir()) / f"blip2-tests-{run}"
    return base.with_suffix(".gate"), base.with_suffix(".turn")


@contextlib.contextmanager
def _turn(alone: bool):
    """A readers-writer lock over the workers of this run, with a gate so `alone` tests are not starved."""
    files = _lock_files()
    if files is None:  # one process: nothing runs beside the test
        yield
        return
    with open(files[0], "a") as gate, open(files[1], "a") as turn:
        fcntl.flock(gate, fcntl.LOCK_EX)
        fcntl.flock(turn, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(gate, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Setup (module fixtures included), call and teardown of a test inside its turn."""
    with _turn(alone=item.get_closest_marker("alone") is not None):
        yield


def pytest_unconfigure(config):
    # A worker that is done: the other one, if still running, has nothing beside it to wait for.
    for path in _lock_files() or ():
        path.unlink(missing_ok=True)


@pytest.fixture
def single_process_group():
    """torch.distributed + megatron-core groups with one process (TP = PP = DP = 1)."""
    from blip2_megatron.parallel import state

    state.initialize_model_parallel(1, 1)
    yield
    state.destroy()


@pytest.fixture(scope="session")
def sample(tmp_path_factory):
    """The built-in dataset (generated once per test session, about 15 s)."""
    from blip2_megatron.data.sample_dataset import ensure_sample_dataset

    return ensure_sample_dataset(tmp_path_factory.mktemp("builtin") / "sample")
