"""Every collective a training job issues fits NCCL and HCCL: device tensors, never float64.

HCCL on Ascend 910B has no float64 reductions, so one float64 tensor in a collective
stops an NPU job at its first log step; NCCL and HCCL refuse a CPU tensor on a device
group ("No backend type associated with device type cpu"), which gloo accepts. Each layout
runs the job under the DeepSpeed launcher with every ``torch.distributed`` operation
recorded and host-made tensors marked (tests/scripts/collective_probe.py), through
training, the pre-emption flag, a validation pass, checkpoints (their free-space check
included: the second save has a previous checkpoint to measure), the final evaluation,
and then a resume from the last checkpoint.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from journeys import DS_CONFIGS, REPO, env

from blip2_megatron.parallel.state import free_port

pytestmark = [pytest.mark.slow]

PROBE = str(REPO / "tests" / "scripts" / "collective_probe.py")
LAYOUTS = {
    "dp2-zero2": ["--ds_config", str(DS_CONFIGS / "zero2.json"), "eval.interval=3"],
    "tp2-zero1": ["--ds_config", str(DS_CONFIGS / "zero1.json"), "model.llm.tp=2"],
    "pp2-zero1": ["--ds_config", str(DS_CONFIGS / "zero1.json"), "model.llm.pp=2"],
    # Stage 1: ITC negatives gathered over DP ranks, retrieval evaluation.
    "stage1-dp2-zero2": ["--ds_config", str(DS_CONFIGS / "zero2.json"), "--config", "tiny_stage1"],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_collectives_fit_nccl_and_hccl(layout, tmp_path, sample):
    args = LAYOUTS[layout]
    probe_dir = tmp_path / "collectives"
    port = free_port()
    command = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(port), PROBE, *args,
        f"train.output_dir={tmp_path / 'run'}",
        f"data.sample_root={sample.root}",
        "train.log_interval=2",
        "train.save_interval=3",
        "data.num_workers=1",
        "eval.max_samples=8",
    ]  # fmt: skip
    for max_steps in (6, 8):  # the second run resumes from the first one's step-6 checkpoint
        proc = subprocess.run(
            [*command, f"train.max_steps={max_steps}"], env={**env(), "BLIP2_COLLECTIVES_DIR": str(probe_dir)},
            capture_output=True, text=True, timeout=600, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-6000:]
        seen: dict[str, int] = {}
        host_tensors: dict[str, int] = {}
        for rank in (0, 1):
            record = json.loads((probe_dir / f"rank{rank}.json").read_text())
            for key, count in record["seen"].items():
                seen[key] = seen.get(key, 0) + count
            for key, count in record["host_tensors"].items():
                host_tensors[key] = host_tensors.get(key, 0) + count
        # DeepSpeed's CPU all-reduce buffers (RAM-backed files in /dev/shm) do not outlive the job.
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        assert any(key.startswith("all_reduce") for key in seen), seen  # the probe saw the job's collectives
        wide = {key: count for key, count in seen.items() if "float64" in key or "complex" in key}
        assert not wide, f"{layout}: float64 collectives {wide}; all seen: {seen}"
        assert not host_tensors, f"{layout}: host tensors sent through a device group: {host_tensors}"
    assert "resumed from" in proc.stdout + proc.stderr, proc.stderr[-3000:]
