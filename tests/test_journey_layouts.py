"""Every layout the README names, trained as a user trains it: ``deepspeed --num_gpus N launch/train.py``.

The default job (tiny_stage2 on the built-in data, whose captions vary in length) runs a
few dozen steps in each layout: DP 2 with ZeRO-0/1/2/3, TP 2, PP 2 and TP 2 x PP 2, and
PP 2 with a trained ViT that outweighs the rest (frozen LLM), whose blocks the partition
puts on both stages (``pp2-vit``, with an untied LLM head). PP layouts run 2 x PP micro-batches per step (the
``train.grad_accum`` default with pipelining). Each
run's loss falls and its end-of-training evaluation runs (VQA on the built-in questions:
the same generation and gathering as captions, without pycocoevalcap's JVM start-ups); a
second run resumed from the first run's mid-way checkpoint logs the same losses as the
uninterrupted run (for DP 2 with ZeRO-2, TP 2 and PP 2 that is shown by test_faults.py,
whose runs of those layouts are killed mid-step and restarted: a launch here costs ~30 s).

Resharding: the TP 2, PP 2 and PP 2 ViT-split runs, rewritten for TP 1 / PP 1 by
``launch/convert.py reshard``, give the same eval loss and the same greedy tokens as before.
"""

from __future__ import annotations

import json
import sys

import pytest
from journeys import DS_CONFIGS, REPO, env, launch, step_records, summary

pytestmark = [pytest.mark.slow, pytest.mark.journey, pytest.mark.dist]

STEPS, SAVE_AT = 16, 8
# name: (processes, tp, pp, ZeRO stage)
LAYOUTS = {
    "dp2-zero0": (2, 1, 1, 0),
    "dp2-zero1": (2, 1, 1, 1),
    "dp2-zero2": (2, 1, 1, 2),
    "dp2-zero3": (2, 1, 1, 3),
    "tp2": (2, 2, 1, 2),
    "pp2": (2, 1, 2, 1),
    "tp2-pp2": (4, 2, 2, 1),
    "pp2-vit": (2, 1, 2, 1),
}
# Layouts' own model settings: a trained ViT of 6 blocks at 64 px that outweighs the rest,
# so that the PP 2 partition holds ViT blocks on both stages. The tiny LLM still trains (its
# loss falls fast) but with an untied head: a trained tied OPT embedding keeps the whole
# image path on stage 0 (models/flops.py, embedding_stays_on_first_stage).
MODEL_OVERRIDES = {
    "pp2-vit": [
        "model.vision.freeze=false",
        "model.vision.image_size=64",
        "model.vision.num_layers=6",
        "model.llm.tie_word_embeddings=false",
    ],
}
# Their resume is checked by test_faults.py's killed-rank restarts: DP 2 and TP 2 under
# ZeRO-2, and PP 2 (with DP 2 there, 4 processes) under ZeRO-1.
RESUMED_BY_FAULT_TESTS = {"dp2-zero2", "tp2", "pp2"}


def _args(sample, run, name: str, *extra: str) -> list[str]:
    _, tp, pp, zero = LAYOUTS[name]
    return [
        "--ds_config",
        str(DS_CONFIGS / f"zero{zero}.json"),
        f"train.output_dir={run}",
        f"data.sample_root={sample.root}",
        f"model.llm.tp={tp}",
        f"model.llm.pp={pp}",
        f"train.max_steps={STEPS}",
        f"train.save_interval={SAVE_AT}",
        "train.log_interval=1",
        "train.warmup_steps=4",
        "data.num_workers=1",
        *MODEL_OVERRIDES.get(name, []),
        *extra,
    ]


@pytest.fixture(scope="module")
def layout_runs(tmp_path_factory, sample):
    """name -> (uninterrupted run, resumed run or None), each layout trained once per module,
    when a test first asks for it (``-k`` selects the layouts that run)."""
    root = tmp_path_factory.mktemp("layouts")
    runs = {}

    def train(name: str):
        if name in runs:
            return runs[name]
        nproc = LAYOUTS[name][0]
        run, resumed = root / name, root / f"{name}-resumed"
        launch(
            "train.py",
            *_args(sample, run, name, "eval.task=vqa", "eval.max_samples=8", "eval.num_beams=1"),
            nproc=nproc,
            timeout=900,
        )
        if name in RESUMED_BY_FAULT_TESTS:
            runs[name] = (run, None)
            return runs[name]
        launch(
            "train.py",
            *_args(
                sample,
                resumed,
                name,
                f"train.resume={run}/checkpoints/step_{SAVE_AT:08d}",
                "eval.enabled=false",
            ),
            nproc=nproc,
            timeout=900,
        )
        runs[name] = (run, resumed)
        return runs[name]

    return train


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_trains_evaluates_and_resumes_exactly(layout_runs, name):
    nproc, tp, pp, _ = LAYOUTS[name]
    run, resumed = layout_runs(name)
    steps = step_records(run)
    assert sorted(steps) == list(range(1, STEPS + 1))
    first = sum(steps[s]["loss"] for s in (1, 2, 3)) / 3
    last = sum(steps[s]["loss"] for s in (STEPS - 2, STEPS - 1, STEPS)) / 3
    assert last < first - 0.2, (first, last)
    stats = summary(run)
    assert (stats["world_size"], stats["tp"], stats["pp"]) == (nproc, tp, pp)
    saved = json.loads((run / "checkpoints" / f"step_{SAVE_AT:08d}" / "trainer_state.json").read_text())
    if pp > 1:
        stages = saved["layout"]["pp_stages"]  # the partition the engine files belong to
        assert len(stages) == pp and stages[-1]["head"]
        if name == "pp2-vit":
            assert [s["vision_blocks"] is not None for s in stages] == [True, True], stages
    assert stats["num_evaluated"] == 8 and 0 <= stats["overall"] <= 100  # the job's evaluation ran
    if resumed is None:
        return
    again = step_records(resumed)
    assert sorted(again) == list(range(SAVE_AT + 1, STEPS + 1)), "the resumed run starts after its checkpoint"
    for step in again:
        assert again[step]["loss"] == pytest.approx(steps[step]["loss"], rel=1e-5, abs=1e-6), step


def _outputs(checkpoint, sample, out, nproc: int = 0, *overrides: str) -> dict:
    import subprocess

    script = str(REPO / "tests" / "scripts" / "layout_outputs.py")
    args = ["--checkpoint", str(checkpoint), "--sample", str(sample.root), "--out", str(out), *overrides]
    if nproc:
        from blip2_megatron.parallel.state import free_port

        command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    else:
        command = [sys.executable, script, *args]
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", ["tp2", "pp2", "pp2-vit"])
def test_resharded_run_gives_the_same_loss_and_tokens(layout_runs, sample, tmp_path, name):
    nproc, tp, pp, _ = LAYOUTS[name]
    run, _ = layout_runs(name)
    before = _outputs(run, sample, tmp_path / "before.json", nproc)
    assert (before["tp"], before["pp"]) == (tp, pp)
    launch(
        "convert.py",
        "reshard",
        "--checkpoint",
        str(run),
        "--tp",
        "1",
        "--pp",
        "1",
        "--out",
        str(tmp_path / "tp1"),
    )
    after = _outputs(tmp_path / "tp1", sample, tmp_path / "after.json")
    assert (after["tp"], after["pp"]) == (1, 1)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
    if "tokens" not in before:
        # A pipeline layout cannot generate: its tokens are those of the same run read whole
        # on each rank, split over TP as evaluation does (TP 2 here).
        before = _outputs(run, sample, tmp_path / "inference.json", nproc, "model.llm.tp=2", "model.llm.pp=1")
    assert after["tokens"] == before["tokens"]
