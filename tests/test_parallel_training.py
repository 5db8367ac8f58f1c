"""Loss parity across parallel layouts: DP, TP, PP and ZeRO stages give the same training.

Every layout trains the same tiny BLIP-2 (frozen OPT-style LLM loaded from one Hugging
Face directory, so every layout starts from identical weights; dropout off) on the same
global batches for a few steps with the real engine code (``build_engine`` /
``build_pipeline_engine`` and their step runners). DP ranks take their slice of each
global batch, TP/PP ranks the whole of it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
GLOBAL_BATCH = 8
CAPTIONS = [
    "a red circle on the left",
    "a small blue square at the top",
    "there is a large green triangle in the center",
    "a picture of a small yellow circle",
    "a purple square on the right",
    "a large orange triangle at the bottom",
    "a green circle in the center on a plain background",
    "a small red square on the left",
]


def _overrides(llm_dir: str, tp: int = 1, pp: int = 1, batch: int = GLOBAL_BATCH) -> list[str]:
    return [
        f"model.llm.weights={llm_dir}",
        "model.llm.freeze=true",
        f"model.llm.tp={tp}",
        f"model.llm.pp={pp}",
        "model.qformer.hidden_dropout_prob=0.0",
        "model.qformer.attention_dropout_prob=0.0",
        f"data.batch_size={batch}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        f"train.max_steps={STEPS}",
    ]


def _global_batches() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=gen),
            "text_input": CAPTIONS[step % 2 :] + CAPTIONS[: step % 2],
            "image_id": list(range(GLOBAL_BATCH)),
        }
        for step in range(STEPS)
    ]


def _slice(batch: dict, rank: int, size: int) -> dict:
    per = GLOBAL_BATCH // size
    part = slice(rank * per, (rank + 1) * per)
    return {
        "image": batch["image"][part],
        "text_input": batch["text_input"][part],
        "image_id": batch["image_id"][part],
    }


def train_layout(rank: int, world: int, llm_dir: str, tp: int, pp: int, zero: int) -> dict:
    """Run STEPS steps in this layout; return DP-averaged losses and frozen/trained checks."""
    from blip2_megatron import accelerator
    from blip2_megatron.models.factory import build_model
    from blip2_megatron.parallel import state
    from blip2_megatron.training.config import load_job_config
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.trainer import DataParallelStep, _mean_over_dp, build_engine

    dp = world // (tp * pp)
    job = load_job_config(None, _overrides(llm_dir, tp, pp, GLOBAL_BATCH // dp))
    state.initialize_model_parallel(tp, pp)
    ds_raw = read_ds_config(REPO / "ds_configs" / f"zero{zero}.json")
    accelerator.manual_seed(job.train.seed)
    if pp > 1:
        from blip2_megatron.parallel.pipeline import build_pipeline_engine

        engine, _, run_step = build_pipeline_engine(job, ds_raw, STEPS, STEPS)
    else:
        model = build_model(job.model)
        engine, _ = build_engine(job, model, ds_raw, STEPS, STEPS)
        run_step = DataParallelStep(engine, 1)
    frozen_before = {
        n: p.detach().clone() for n, p in engine.module.named_parameters() if not p.requires_grad
    }
    trained_before = {n: p.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    batches = iter([_slice(b, state.dp_rank(), dp) for b in _global_batches()])
    losses = []
    for _ in range(STEPS):
        step_losses, _ = run_step(batches)
        # The pipeline engine already averages over DP; the plain engine reports this rank's.
        losses.append(step_losses["loss"] if pp > 1 else _mean_over_dp(step_losses)["loss"])
    frozen_equal = all(
        torch.equal(p, frozen_before[n]) for n, p in engine.module.named_parameters() if n in frozen_before
    )
    moved = sum(
        not torch.equal(p, trained_before[n])
        for n, p in engine.module.named_parameters()
        if n in trained_before
    )
    return {
        "losses": losses,
        "frozen_equal": frozen_equal,
        "trained_moved": moved,
        "num_frozen": len(frozen_before),
    }


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> str:
    """A tiny random OPT saved the Hugging Face way: every layout loads the same LLM."""
    from transformers import OPTForCausalLM

    from blip2_megatron.config import build_model_config
    from blip2_megatron.convert.hf_blip2 import hf_text_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("opt_tiny")
    OPTForCausalLM(hf_text_config(build_model_config("tiny").llm)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(llm_dir) -> dict:
    return run_distributed(train_layout, 1, llm_dir, 1, 1, 0)[0]


@pytest.mark.dist
@pytest.mark.slow
def test_single_process_reference_trains_and_keeps_frozen_weights(reference):
    losses = reference["losses"]
    assert losses[-1] < losses[0], losses
    assert reference["frozen_equal"] and reference["num_frozen"] > 0
    assert reference["trained_moved"] > 0


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "pp", "zero"),
    [(1, 1, 0), (1, 1, 1), (1, 1, 2), (2, 1, 1), (1, 2, 1)],
    ids=["dp2-zero0", "dp2-zero1", "dp2-zero2", "tp2", "pp2"],
)
def test_two_process_layouts_match_single_process(llm_dir, reference, tp, pp, zero):
    results = run_distributed(train_layout, 2, llm_dir, tp, pp, zero)
    for result in results:
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5
        )
        assert result["frozen_equal"]
