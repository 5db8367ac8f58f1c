import os
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", module="megatron")

import pytest  # noqa: E402


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
