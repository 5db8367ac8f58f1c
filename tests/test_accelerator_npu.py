"""blip2_megatron.accelerator follows DeepSpeed's accelerator object, so an Ascend NPU works.

No NPU here: a fake accelerator with DeepSpeed's interface (device_name() -> "npu",
communication_backend_name() -> "hccl", ...) stands in for deepspeed's NPU_Accelerator.
The choices the package makes from it (device type, backend, device, autocast, seeding,
memory, peak FLOP/s) must follow it. Where a real ``torch.device("npu:0")`` is needed, a
child process renames torch's PrivateUse1 backend to "npu" and registers a stub
``torch.npu`` module, which is what torch_npu does on import.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import types
from concurrent.futures import ProcessPoolExecutor

import pytest
import torch

from blip2_megatron import accelerator


class FakeNpuAccelerator:
    """The parts of DeepSpeed's NPU_Accelerator the package calls, with call records."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def device_name(self, device_index=None) -> str:
        return "npu" if device_index is None else f"npu:{device_index}"

    def current_device_name(self) -> str:
        return "npu:0"

    def communication_backend_name(self) -> str:
        return "hccl"

    def set_device(self, index: int) -> None:
        self.calls.append(("set_device", index))

    def manual_seed_all(self, seed: int) -> None:
        self.calls.append(("manual_seed_all", seed))

    def get_rng_state(self):
        return torch.tensor([7], dtype=torch.uint8)

    def set_rng_state(self, state) -> None:
        self.calls.append(("set_rng_state", int(state[0])))

    def synchronize(self) -> None:
        self.calls.append(("synchronize",))

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        return True

    def reset_peak_memory_stats(self) -> None:
        self.calls.append(("reset_peak_memory_stats",))

    def max_memory_allocated(self) -> int:
        return 3 * 2**30

    def device_count(self) -> int:
        return 8


@pytest.fixture
def fake_npu(monkeypatch):
    """The package's accelerator answers from a fake NPU accelerator."""
    fake = FakeNpuAccelerator()
    monkeypatch.setattr(accelerator, "get_accelerator", lambda: fake)
    return fake


def test_device_choices_follow_the_accelerator(fake_npu):
    assert accelerator.device_type() == "npu"
    assert not accelerator.is_cpu()
    assert accelerator.communication_backend() == "hccl"
    assert accelerator.device_count() == 8
    accelerator.set_device(3)
    assert ("set_device", 3) in fake_npu.calls


def test_autocast_requests_npu(fake_npu, monkeypatch):
    # torch.autocast(device_type="npu") needs torch_npu in this process; record the request.
    requested = []

    def fake_autocast(device_type, dtype=None, **kwargs):
        requested.append((device_type, dtype))
        return contextlib.nullcontext()

    monkeypatch.setattr(torch, "autocast", fake_autocast)
    accelerator.autocast(torch.bfloat16)
    accelerator.autocast(torch.float16)
    assert requested == [("npu", torch.bfloat16), ("npu", torch.float16)]
    # fp32 (and None) means no autocast at all, on any device.
    assert isinstance(accelerator.autocast(torch.float32), contextlib.nullcontext)
    assert isinstance(accelerator.autocast(None), contextlib.nullcontext)
    assert len(requested) == 2


def test_seed_rng_memory_and_sync_go_to_the_device(fake_npu):
    accelerator.manual_seed(1234)
    assert ("manual_seed_all", 1234) in fake_npu.calls
    state = accelerator.rng_state()
    assert int(state["device"][0]) == 7
    accelerator.set_rng_state(state)
    assert ("set_rng_state", 7) in fake_npu.calls
    accelerator.synchronize()
    accelerator.reset_peak_memory()
    assert ("synchronize",) in fake_npu.calls and ("reset_peak_memory_stats",) in fake_npu.calls
    assert accelerator.peak_memory_bytes() == 3 * 2**30
    assert accelerator.supports_dtype(torch.bfloat16) and accelerator.supports_dtype(torch.float16)


def test_peak_tflops_of_910b(fake_npu, monkeypatch):
    # torch_npu reports names such as "Ascend910B3"; MFU needs that variant's peak.
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(get_device_name=lambda: "Ascend910B3"), raising=False
    )
    assert accelerator.peak_tflops("bf16") == 313.0
    # An unknown device name means "no MFU", not a crash.
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(get_device_name=lambda: "Ascend310P"), raising=False
    )
    assert accelerator.peak_tflops("bf16") is None


@pytest.mark.parametrize(
    "device_name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.0),  # SXM
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 NVL", "fp16", 835.0),
        ("NVIDIA H200", "bf16", 989.0),
        ("NVIDIA H200 NVL", "bf16", 835.0),
        ("NVIDIA H800", "bf16", 989.0),
        ("NVIDIA H800 PCIe", "bf16", 756.0),
        ("NVIDIA H20", "bf16", 148.0),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
        ("NVIDIA A800-SXM4-80GB", "fp16", 312.0),
        ("NVIDIA L40S", "bf16", 362.0),
        ("NVIDIA L40", "bf16", 181.0),
        ("Ascend910B1", "bf16", 414.0),
        ("Ascend910B2", "bf16", 376.0),
        ("Ascend910B2C", "fp16", 376.0),
        ("Ascend910B3", "fp16", 313.0),
        ("Ascend910B4", "bf16", 280.0),
        ("Ascend910_9392", "bf16", 376.0),
        ("Ascend910B3", "fp32", None),
        ("cpu", "bf16", None),
    ],
)
def test_peak_table_covers_the_devices_users_train_on(device_name, dtype, peak):
    assert accelerator.peak_tflops(dtype, device_name) == peak


def test_npu_mapping_is_imported_before_megatron_core(tmp_path):
    """On Ascend the package root imports torch_npu's cuda->npu mapping before megatron-core loads.

    A stand-in torch_npu package records whether megatron.core was already imported when
    its ``transfer_to_npu`` ran; the child imports the LLM module, which imports megatron-core.
    """
    import os
    import subprocess
    import sys

    fake = tmp_path / "torch_npu"
    (fake / "contrib").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "contrib" / "__init__.py").write_text("")
    record = tmp_path / "record.txt"
    (fake / "contrib" / "transfer_to_npu.py").write_text(
        "import sys\n"
        f"open({str(record)!r}, 'w').write(str(sorted(m for m in sys.modules if m.startswith('megatron'))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    code = "import blip2_megatron.models.llm, sys; assert 'megatron.core' in sys.modules"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert record.read_text() == "[]"  # no megatron module was loaded before the mapping

    # A job told to run elsewhere (DS_ACCELERATOR=cpu / cuda) leaves torch_npu alone.
    record.unlink()
    env["DS_ACCELERATOR"] = "cpu"
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert not record.exists()


def test_megatron_core_imports_without_dynamo_or_wandb_and_leaves_both_usable():
    """The package root keeps megatron-core's import from loading torch._dynamo and wandb.

    Every process of every job imports megatron-core; its import compiles fused kernels we never
    call (torch._dynamo + torch._inductor, ~3 CPU-s) and imports wandb (~1.5 s). Afterwards
    ``torch.compile`` is torch's own again and wandb imports as usual.
    """
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "real = torch.compile\n"
        "import blip2_megatron.models.llm\n"
        "assert 'megatron.core' in sys.modules\n"
        "heavy = [m for m in ('torch._dynamo', 'torch._inductor', 'wandb') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert torch.compile is real\n"
        "import wandb, megatron.core.jit\n"
        "assert megatron.core.jit.jit_fuser is megatron.core.jit.noop_decorator\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_ds_accelerator_npu_imports_adaptors_when_present(monkeypatch, caplog):
    """_ds_accelerator() takes DeepSpeed's choice; on "npu" it imports torch_npu's mapping and survives without it."""
    import deepspeed.accelerator

    fake = FakeNpuAccelerator()
    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: fake)
    imported = []
    monkeypatch.setattr(accelerator, "_import_ascend_adaptors", lambda: imported.append(True))
    accelerator._ds_accelerator.cache_clear()
    try:
        assert accelerator.get_accelerator() is fake
        assert accelerator.get_accelerator() is fake  # cached: one lookup, one adaptor import
        assert imported == [True]
        assert accelerator.device_type() == "npu"
    finally:
        accelerator._ds_accelerator.cache_clear()  # the next caller gets the real (CPU) accelerator
    # The adaptor import itself tolerates a machine without torch_npu / MindSpeed.
    monkeypatch.undo()
    with caplog.at_level("INFO", logger=accelerator.__name__):
        accelerator._import_ascend_adaptors()
    import importlib.util

    expected = "imported torch_npu" if importlib.util.find_spec("torch_npu") else "torch_npu is not installed"
    assert expected in caplog.text


def _in_child_with_npu_device_type() -> dict:
    """Runs in a fresh process: make "npu" a torch device type the way torch_npu does."""
    torch.utils.rename_privateuse1_backend("npu")
    npu_module = types.ModuleType("torch.npu")
    npu_module.is_available = lambda: True
    npu_module.get_amp_supported_dtype = lambda: [torch.float16, torch.bfloat16]
    npu_module.is_bf16_supported = lambda: True
    torch._register_device_module("npu", npu_module)
    accelerator.get_accelerator = FakeNpuAccelerator  # a fresh process: nothing to restore
    ctx = accelerator.autocast(torch.bfloat16)
    with ctx:
        enabled = torch.is_autocast_enabled("npu")
        dtype = torch.get_autocast_dtype("npu")
    return {
        "current_device": str(accelerator.current_device()),
        "autocast_device": ctx.device,
        "autocast_dtype": str(ctx.fast_dtype),
        "enabled_inside": enabled,
        "dtype_inside": str(dtype),
    }


def test_current_device_and_real_autocast_on_npu_device_type():
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        got = pool.submit(_in_child_with_npu_device_type).result(timeout=120)
    assert got == {
        "current_device": "npu:0",
        "autocast_device": "npu",
        "autocast_dtype": "torch.bfloat16",
        "enabled_inside": True,
        "dtype_inside": "torch.bfloat16",
    }
