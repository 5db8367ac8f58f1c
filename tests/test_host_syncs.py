"""Host syncs per training step: a few per step under the configuration a GPU user gets, never one per tensor.

Each read of a device value on the host (``.item()``, ``bool(t)``, ``.tolist()``, ...) makes
the host wait for the device queue on a GPU or NPU. They are counted here on CPU by the
probe in tests/scripts/collective_probe.py, which tells device tensors from host-made ones
(reads of host tensors, such as the batch builder's, wait for nothing and are not counted).

Under ``ds_configs/zero2.json`` at one data-parallel rank in bf16, DeepSpeed's stage 0 would
wrap torch's AdamW in its unfused fp16 optimizer, whose overflow check reads every trained
tensor, and the trainer would read every loss; ZeRO kept checks all gradients at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from dist_utils import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))

REPO = Path(__file__).resolve().parents[1]
MEASURED_STEPS = 3
CAPTIONS = [
    "a dot",
    "two big blue squares on a plain background",
    "a red circle",
    "a small square at the top",
]

pytestmark = [pytest.mark.dist]


def _samples(step: int) -> dict:
    import torch

    gen = torch.Generator().manual_seed(step)
    captions = CAPTIONS[step % 4 :] + CAPTIONS[: step % 4]
    return {
        "image": torch.randn(4, 3, 32, 32, generator=gen),
        "text_input": captions,
        "image_id": [0, 1, 2, 3],
    }


def host_syncs_per_step(rank: int, world: int, precision: str, drops_idle_zero: bool | None) -> dict:
    import collective_probe as probe

    from blip2_megatron import accelerator
    from blip2_megatron.config import load_job_config
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.parallel import state
    from blip2_megatron.training import ds_config
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.engine import build_engine

    if drops_idle_zero is not None:  # another device's ZeRO choice (the rest runs on this CPU)
        ds_config.drops_idle_zero = lambda precision: drops_idle_zero
    job = load_job_config("tiny_stage2", [f"train.precision={precision}", "data.batch_size=4"])
    state.initialize_model_parallel(1, 1)
    accelerator.manual_seed(0)
    engine = build_engine(job, read_ds_config(REPO / "ds_configs" / "zero2.json"), 10, 10)
    builder = build_batch_builder(job.model)
    # Built lazily, inside the probe: the batch builder's tensors are host tensors, as on a GPU.
    batches = (builder(_samples(step)) for step in range(100))
    for _ in range(2):  # one-time work (buffers, first-step bookkeeping) is not per step
        engine.step(batches)
    tracker = probe.HostTensorTracker()
    with tracker:
        for _ in range(MEASURED_STEPS):
            engine.step(batches)
    trained = sum(p.requires_grad for p in engine.model.parameters())
    return {"syncs": dict(tracker.syncs), "zero_stage": engine.zero_stage, "trained_tensors": trained}


@pytest.mark.parametrize(
    ("precision", "drops_idle_zero", "zero_stage"),
    [("bf16", None, 2), ("fp32", None, 0), ("bf16", True, 0)],
    ids=["bf16-as-on-gpu", "fp32-as-on-cpu", "bf16-at-stage-0-as-before"],
)
def test_host_syncs_per_step(precision, drops_idle_zero, zero_stage, monkeypatch):
    """bf16 as on a GPU: a few per step. fp32 as on CPU: one (the loss check). bf16 at stage 0: one per tensor.

    DeepSpeed has no fp16 on CPU; fp16 takes the same ZeRO path as bf16 on a GPU.
    """
    result = run_distributed(host_syncs_per_step, 1, precision, drops_idle_zero)[0]
    syncs, trained = result["syncs"], result["trained_tensors"]
    per_step = sum(syncs.values()) / MEASURED_STEPS
    print(f"{precision} (ZeRO {result['zero_stage']}): {per_step:.1f} host syncs per step, {syncs}")
    assert result["zero_stage"] == zero_stage
    assert trained > 50  # the Q-Former's tensors: a read per tensor shows
    if drops_idle_zero:  # what the old ZeRO choice gave a GPU user: the probe sees every tensor read
        assert per_step >= trained, syncs
    else:
        assert per_step <= 3, f"{per_step} host syncs per step for {trained} trained tensors: {syncs}"
