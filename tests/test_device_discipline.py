"""Device discipline of collectives: the check itself, and the checkpoint code under it.

NCCL takes only CUDA tensors and HCCL only NPU ones; gloo takes anything, so a CPU run
cannot fail on a host tensor sent through a device group. The probe in
tests/scripts/collective_probe.py marks the tensors made for the host and records every
collective on a device group that carries one (see its docstring). Here, in two gloo
processes: the probe flags exactly the mistakes it is meant to (and lets the right forms
through), and the checkpoint's collectives (free-space check, the ranks' agreement on a
failed write) pass it. The whole training job, with saves, a resume, validation and the
final evaluation, runs under the probe in tests/test_collectives.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dist_utils import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

pytestmark = [pytest.mark.dist]


def _flagged(probe, action) -> list[str]:
    before = dict(probe.HOST_TENSORS)
    action()
    return [k for k, v in probe.HOST_TENSORS.items() if v != before.get(k, 0)]


def probe_flags_host_tensors_on_device_groups(rank: int, world: int) -> dict[str, list[str]]:
    import collective_probe as probe
    import torch
    import torch.distributed as dist

    from blip2_megatron import accelerator
    from blip2_megatron.parallel import state

    probe.install()
    state.initialize_model_parallel(1, 1)
    device = accelerator.current_device()
    cases = {
        "factory without a device": lambda: dist.all_reduce(torch.ones(1)),
        "computed from a host tensor": lambda: dist.broadcast(torch.tensor([2.0]).float() * 3, src=0),
        "moved to the host": lambda: dist.all_reduce(torch.ones(1, device=device).cpu()),
        "on the data-parallel group": lambda: dist.all_reduce(torch.zeros(2), group=state.dp_group()),
        "device_tensor": lambda: dist.all_reduce(accelerator.device_tensor([1.0])),
        "factory on the device": lambda: dist.all_reduce(torch.ones(1, device=device)),
        "host tensor moved to the device": lambda: dist.all_reduce(torch.ones(1).to(device)),
        "host tensor on the host group": lambda: dist.all_reduce(torch.ones(1), group=state.host_group()),
        "a parameter's gradient": lambda: dist.all_reduce(_gradient(device)),
    }
    return {name: _flagged(probe, action) for name, action in cases.items()}


def _gradient(device):
    import torch

    weight = torch.nn.Linear(3, 2).to(device).weight
    (weight * 2).sum().backward()
    return weight.grad


def test_the_probe_flags_host_tensors_on_device_groups_only():
    flagged = run_distributed(probe_flags_host_tensors_on_device_groups, 2)[0]
    for mistake in ("factory without a device", "computed from a host tensor", "moved to the host"):
        assert flagged[mistake], f"{mistake}: not flagged"
        assert "test_device_discipline.py" in flagged[mistake][0], flagged[mistake]
    assert flagged["on the data-parallel group"]
    for right in (
        "device_tensor",
        "factory on the device",
        "host tensor moved to the device",
        "host tensor on the host group",
        "a parameter's gradient",
    ):
        assert not flagged[right], f"{right}: flagged as {flagged[right]}"


def checkpoint_collectives(rank: int, world: int, root: str) -> list[str]:
    import collective_probe as probe

    from blip2_megatron.config import load_job_config
    from blip2_megatron.parallel import state
    from blip2_megatron.training import checkpoint
    from blip2_megatron.training.faults import TrainingStopped

    probe.install()
    state.initialize_model_parallel(1, 1)
    job = load_job_config("tiny_stage2", [f"train.output_dir={root}"])
    ckpt_root = checkpoint.checkpoint_root(job)
    (ckpt_root / "step_00000002").mkdir(parents=True, exist_ok=True)
    (ckpt_root / "step_00000002" / "weights.bin").write_bytes(b"0" * 1024)
    checkpoint._check_free_space(ckpt_root, job)  # a previous checkpoint: rank 0 measures, all learn

    class FullDisk:  # this rank's own weights cannot be written
        def named_parameters(self):
            raise OSError(28, "No space left on device")

    class FailingEngine:  # DeepSpeed's save passes, then our write fails
        zero_stage = 0
        model = FullDisk()

        class ds:
            @staticmethod
            def save_checkpoint(*args, **kwargs):
                pass

    stopped = False
    try:
        checkpoint.save_checkpoint(FailingEngine(), job, 4, {})
    except TrainingStopped:
        stopped = True
    assert stopped, "a failed write must stop every rank"
    return sorted(probe.HOST_TENSORS)


def test_checkpoint_collectives_carry_device_tensors(tmp_path):
    """Fails on the old code: the free-space check and the write agreement sent CPU tensors."""
    for rank_flags in run_distributed(checkpoint_collectives, 2, str(tmp_path)):
        assert rank_flags == [], rank_flags
