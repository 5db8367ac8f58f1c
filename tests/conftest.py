import os
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", module="megatron")

import pytest  # noqa: E402

# ----------------------------------------------------------------------------- two workers
# `python3 -m pytest` runs two test files at once (pyproject.toml: -n 2 --dist loadfile):
# most of the suite is subprocesses starting up (imports, the launcher, a JVM), which keep
# one of two cores busy. Files known to take longest are handed out first, so that no long
# file starts last (pyproject.toml's --no-loadscope-reorder: pytest-xdist would otherwise hand
# out the files with the most tests first, and a long file of one test would start last).
# A test that bounds a time shares the CPU with the other worker, so its
# bound keeps a wide margin over what it measures on a loaded machine (the killed-rank
# faults: 7-12 s against 60 s) or it runs on a clock the test drives (the throughput meter).

LONGEST_FIRST = (
    "test_readme.py",
    "test_journey_layouts.py",
    "test_faults.py",
    "test_journey_chains.py",
    "test_slurm_multinode.py",
    "test_parallel_training.py",
    "test_journey_reshard_export.py",
    "test_collectives.py",
    "test_validate_script.py",
    "test_journey_stage1_eval.py",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order and stay together


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
