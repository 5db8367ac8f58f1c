"""Loss parity across parallel layouts: DP, TP, PP and ZeRO stages give the same training.

Every layout trains the same tiny BLIP-2 (OPT-style LLM loaded from one Hugging Face
directory, so every layout starts from identical weights; dropout off) on the same global
batches for a few steps with the real engine (``training/engine.py``) and batch builder.
Captions differ in length from step to step (the padded length changes, as with real
data). DP ranks take their slice of each global batch, TP/PP ranks the whole of it. The
LLM is frozen, as in BLIP-2, and also trained (the tiny default job trains it; with PP the
tied OPT embedding then lives on two stages and must stay one weight). With a trained ViT
that outweighs the rest (4 blocks at 64 px), the PP 2 partition puts ViT blocks on both
stages: the ViT's hidden states (each TP rank's own rows) travel between stages and the
bridge on stage 1 gathers them.

Every layout runs one micro-batch per step (``train.grad_accum=1``; PP > 1 would default
to 2 x PP), so each step sees the same global batch as the single process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
GLOBAL_BATCH = 8
SHORT = ["a dot", "two big blue squares", "a red circle", "a small square"]
MEDIUM = [
    "a red circle on the left",
    "a small blue square at the top",
    "there is a large green triangle in the center",
    "a picture of a small yellow circle",
]
LONG = ["a green circle in the center on a plain background of a picture with a small red square on the left"]
# Per step: which captions the 8 samples get (the padded length differs from step to step).
# Both halves (the two DP ranks' shares) hold the same captions: the loss is a mean over
# labelled tokens per rank, and DP averages the ranks' means, which equals the one-process
# mean over the whole batch only when the ranks hold as many labelled tokens.
STEP_CAPTIONS = [SHORT * 2, (MEDIUM[:3] + LONG) * 2, MEDIUM * 2, (LONG + SHORT[:3]) * 2]


# A trained ViT of 4 blocks at 64 px: at PP 2 its blocks land on both stages.
TRAINED_VIT = ["model.vision.freeze=false", "model.vision.image_size=64", "model.vision.num_layers=4"]


def _image_size(vit: bool) -> int:
    return 64 if vit else 32


def _overrides(
    llm_dir: str, tp: int = 1, pp: int = 1, batch: int = GLOBAL_BATCH, freeze: bool = True, vit: bool = False
) -> list[str]:
    return [
        *(TRAINED_VIT if vit else []),
        f"model.llm.weights={llm_dir}",
        f"model.llm.freeze={str(freeze).lower()}",
        f"model.llm.tp={tp}",
        f"model.llm.pp={pp}",
        "model.qformer.hidden_dropout_prob=0.0",
        "model.qformer.attention_dropout_prob=0.0",
        f"data.batch_size={batch}",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        f"train.max_steps={STEPS}",
        "train.grad_accum=1",
    ]


def _global_samples(size: int = 32) -> list[dict]:
    """One global batch per step; the caption mix (so the padded length) changes every step."""
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.randn(GLOBAL_BATCH, 3, size, size, generator=gen),
            "text_input": STEP_CAPTIONS[step],
            "image_id": list(range(GLOBAL_BATCH)),
        }
        for step in range(STEPS)
    ]


def _slice(samples: dict, rank: int, size: int) -> dict:
    per = GLOBAL_BATCH // size
    return {name: values[rank * per : (rank + 1) * per] for name, values in samples.items()}


def train_layout(
    rank: int, world: int, llm_dir: str, tp: int, pp: int, zero: int, freeze: bool, vit: bool = False
) -> dict:
    """Run STEPS steps in this layout; return DP-averaged losses and frozen/trained checks.

    ``vit``: train the ViT (4 blocks at 64 px) with the LLM frozen.
    """
    from blip2_megatron import accelerator
    from blip2_megatron.config import load_job_config
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.parallel import state
    from blip2_megatron.training.ds_config import read_ds_config
    from blip2_megatron.training.engine import build_engine
    from blip2_megatron.training.trainer import _reduce_over_dp

    dp = world // (tp * pp)
    from blip2_megatron.models.flops import pipeline_partition

    job = load_job_config(None, _overrides(llm_dir, tp, pp, GLOBAL_BATCH // dp, freeze, vit))
    state.initialize_model_parallel(tp, pp)
    ds_raw = read_ds_config(REPO / "ds_configs" / f"zero{zero}.json")
    accelerator.manual_seed(job.train.seed)
    engine = build_engine(job, ds_raw, STEPS, STEPS)
    params = dict(engine.model.named_parameters())
    with engine.gathered_parameters(list(params)):
        frozen_before = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
        trained_before = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    builder = build_batch_builder(job.model)
    samples = _global_samples(_image_size(vit))
    batches = iter([builder(_slice(s, state.dp_rank(), dp)) for s in samples])
    lengths = sorted({b["input_ids"].shape[1] for b in [builder(s) for s in samples]})
    losses = []
    for _ in range(STEPS):
        step_losses = engine.step(batches).losses
        # The pipeline engine already averages over DP; the plain engine reports this rank's.
        losses.append(float(step_losses["loss"]) if pp > 1 else _reduce_over_dp(step_losses, {})[0]["loss"])
    with engine.gathered_parameters(list(params)):
        frozen_equal = all(torch.equal(params[n], before) for n, before in frozen_before.items())
        moved = sum(not torch.equal(params[n], before) for n, before in trained_before.items())
    return {
        "losses": losses,
        "frozen_equal": frozen_equal,
        "trained_moved": moved,
        "num_frozen": len(frozen_before),
        "padded_lengths": lengths,
        "partition": [stage.to_json() for stage in pipeline_partition(job.model, pp)],
        "trained_names": sorted(trained_before),
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
    return run_distributed(train_layout, 1, llm_dir, 1, 1, 0, True)[0]


@pytest.fixture(scope="module")
def reference_llm_trained(llm_dir) -> dict:
    return run_distributed(train_layout, 1, llm_dir, 1, 1, 0, False)[0]


@pytest.fixture(scope="module")
def reference_vit_trained(llm_dir) -> dict:
    return run_distributed(train_layout, 1, llm_dir, 1, 1, 0, True, True)[0]


@pytest.mark.dist
@pytest.mark.slow
def test_single_process_reference_trains_and_keeps_frozen_weights(reference):
    losses = reference["losses"]
    assert losses[-1] < losses[0], losses
    assert reference["frozen_equal"] and reference["num_frozen"] > 0
    assert reference["trained_moved"] > 0
    assert len(reference["padded_lengths"]) > 1, "the padded caption length must vary between steps"


def _assert_same_losses(results: list[dict], reference: dict) -> None:
    for result in results:
        torch.testing.assert_close(
            torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-4, atol=1e-5
        )
        assert result["frozen_equal"]


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(
    ("tp", "pp", "zero"),
    [(1, 1, 0), (1, 1, 1), (1, 1, 2), (1, 1, 3), (2, 1, 1), (1, 2, 1)],
    ids=["dp2-zero0", "dp2-zero1", "dp2-zero2", "dp2-zero3", "tp2", "pp2"],
)
def test_two_process_layouts_match_single_process(llm_dir, reference, tp, pp, zero):
    _assert_same_losses(run_distributed(train_layout, 2, llm_dir, tp, pp, zero, True), reference)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(("tp", "pp", "zero"), [(2, 1, 2), (1, 2, 1)], ids=["tp2", "pp2"])
def test_trained_llm_layouts_match_single_process(llm_dir, reference_llm_trained, tp, pp, zero):
    """A trained OPT LLM: TP-split weights step in sync, and with PP the tied embedding stays one weight."""
    _assert_same_losses(run_distributed(train_layout, 2, llm_dir, tp, pp, zero, False), reference_llm_trained)


@pytest.mark.dist
@pytest.mark.slow
def test_tp2_pp2_on_four_processes_matches_single_process(llm_dir, reference):
    _assert_same_losses(run_distributed(train_layout, 4, llm_dir, 2, 2, 1, True), reference)


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize(("world", "tp"), [(2, 1), (4, 2)], ids=["pp2", "tp2-pp2"])
def test_trained_vit_split_over_stages_matches_single_process(llm_dir, reference_vit_trained, world, tp):
    """ViT blocks on both stages (stage 1 also holds the bridge and the LLM): the same losses
    as one process; with TP 2 each rank's ViT rows travel along its own pipeline."""
    results = run_distributed(train_layout, world, llm_dir, tp, 2, 1, True, True)
    partition = results[0]["partition"]
    assert [s["vision_blocks"] is not None for s in partition] == [True, True], partition
    assert not partition[0]["bridge"] and partition[1]["bridge"]
    assert reference_vit_trained["losses"][-1] < reference_vit_trained["losses"][0]
    _assert_same_losses(results, reference_vit_trained)
    # Each stage trains its own ViT blocks (and the last one the Q-Former and projection).
    first, last = results[0]["trained_names"], results[-1]["trained_names"]
    assert any("encoder.layers.0." in name for name in first) and not any("qformer" in n for n in first)
    assert any("encoder.layers.3." in name for name in last) and any("qformer" in n for n in last)
    assert all(r["trained_moved"] > 0 for r in results)
