"""Pipeline runs exported to transformers, and runs resharded, resumed and read in another layout.

All through the user's commands (``deepspeed launch/train.py``, ``python launch/convert.py
ours-to-hf`` / ``reshard``) on the default job (tiny_stage2, built-in data), every run with
``train.grad_accum=2`` so that each step sees the same data whatever the layout (the auto
default would give PP 2 four micro-batches and PP 1 one). Every layout here has DP = 1.

Export: a PP 2 run and a TP 2 x PP 2 run, exported to a transformers Blip2 directory that
``Blip2ForConditionalGeneration.from_pretrained`` loads, give transformers' loss on eight
val captions equal to the loss the training engine computes in the run's own layout (the
pipeline engine on 2 / 4 processes), and transformers' greedy tokens equal to ours.

Resharding: a run resumed in another layout from ``launch/convert.py reshard`` restores
its step, schedule and data position, but not the Adam moments (DeepSpeed's per-rank
optimizer files belong to the old layout; the log says they start afresh). So "the losses
continue as the original layout's would" is checked in two ways that can each fail:

* the first resumed step's loss, computed from the saved weights on the next batch before
  any update, equals the uninterrupted run's loss at that step (weights re-cut right, data
  position and schedule restored);
* every resumed step equals the original layout resumed the same way, from its own saved
  weights with fresh moments (the run resharded to its own layout, which drops the engine
  files), within the layout tests' tolerance (tests/test_parallel_training.py).

TP 2 -> TP 1 and PP 1 -> PP 2 are resumed; TP 1 -> TP 2 and PP 1 -> PP 2 give the same eval
loss and greedy tokens as the TP 1 run; the TP 2 x PP 2 run resharded to TP 1 too. The
losses are the sharp check (equal to ~1e-6); a dozen steps teach the tiny model only a few
tokens, so the tokens are asserted not to be one token repeated, little more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from journeys import DS_CONFIGS, REPO, env, launch, step_records

pytestmark = [pytest.mark.slow, pytest.mark.journey, pytest.mark.dist]

STEPS, SAVE_AT = 12, 6
LOSS_TOL = dict(rel=1e-4, abs=1e-5)  # as tests/test_parallel_training.py: layouts sum in other orders
# name: (processes, tp, pp) of the runs trained from scratch
RUNS = {"tp1": (1, 1, 1), "tp2": (2, 2, 1), "tp2-pp2": (4, 2, 2)}
FRESH_MOMENTS = "the optimizer's moments start afresh"
NUM_VAL = 8  # the val images tests/scripts/layout_outputs.py scores and captions


def _train_args(sample, run: Path, tp: int, pp: int, *extra: str) -> list[str]:
    return [
        "--ds_config",
        str(DS_CONFIGS / "zero1.json"),
        f"train.output_dir={run}",
        f"data.sample_root={sample.root}",
        f"model.llm.tp={tp}",
        f"model.llm.pp={pp}",
        f"train.max_steps={STEPS}",
        f"train.save_interval={SAVE_AT}",
        "train.log_interval=1",
        "train.warmup_steps=2",
        "train.grad_accum=2",
        "eval.enabled=false",
        "data.num_workers=1",
        *extra,
    ]


def _reshard(checkpoint: Path, out: Path, tp: int, pp: int) -> Path:
    proc = launch(
        "convert.py",
        "reshard",
        "--checkpoint",
        str(checkpoint),
        "--tp",
        str(tp),
        "--pp",
        str(pp),
        "--out",
        str(out),
    )
    assert proc.stdout.startswith("wrote "), proc.stdout
    state = json.loads(next((out / "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert (state["layout"]["tp"], state["layout"]["pp"]) == (tp, pp)
    return out


@pytest.fixture(scope="module")
def journeys(tmp_path_factory, sample):
    """Runs, reshards, resumes and layout outputs, each made once per module when a test first asks."""
    root = tmp_path_factory.mktemp("reshard_export")
    made: dict[tuple, object] = {}

    class Journeys:
        def run(self, name: str) -> Path:
            if ("run", name) not in made:
                nproc, tp, pp = RUNS[name]
                launch("train.py", *_train_args(sample, root / name, tp, pp), nproc=nproc, timeout=900)
                made[("run", name)] = root / name
            return made[("run", name)]

        def resharded(self, name: str, tp: int, pp: int, step: int = SAVE_AT) -> Path:
            """Run ``name``'s checkpoint of ``step`` rewritten for TP = tp, PP = pp."""
            key = ("reshard", name, tp, pp, step)
            if key not in made:
                checkpoint = self.run(name) / "checkpoints" / f"step_{step:08d}"
                made[key] = _reshard(checkpoint, root / f"{name}-{step}-as-tp{tp}-pp{pp}", tp, pp)
            return made[key]

        def resumed(self, name: str, tp: int, pp: int) -> tuple[Path, str]:
            """(run dir, launcher output) of training resumed from ``resharded(name, tp, pp)``."""
            key = ("resume", name, tp, pp)
            if key not in made:
                source = self.resharded(name, tp, pp)
                out = root / f"{name}-resumed-tp{tp}-pp{pp}"
                proc = launch(
                    "train.py",
                    *_train_args(sample, out, tp, pp, f"train.resume={source}"),
                    nproc=tp * pp,
                    timeout=900,
                )
                made[key] = (out, proc.stdout + proc.stderr)
            return made[key]

        def outputs(self, checkpoint: Path, nproc: int, *overrides: str) -> dict:
            key = ("outputs", str(checkpoint), nproc, overrides)
            if key not in made:
                made[key] = _layout_outputs(
                    checkpoint, sample, root / f"outputs-{len(made)}.json", nproc, *overrides
                )
            return made[key]

    return Journeys()


def _layout_outputs(checkpoint: Path, sample, out: Path, nproc: int, *overrides: str) -> dict:
    """tests/scripts/layout_outputs.py: the eval loss on 8 val captions in the checkpoint's
    layout (or the overrides'), and greedy tokens when the whole model is on each rank."""
    from blip2_megatron.parallel.state import free_port

    script = str(REPO / "tests" / "scripts" / "layout_outputs.py")
    args = ["--checkpoint", str(checkpoint), "--sample", str(sample.root), "--out", str(out), *overrides]
    if nproc > 1:
        command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    else:
        command = [sys.executable, script, *args]
    proc = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------ resume resharded
def _assert_resumed_as_original_layout(journeys, name: str, target: tuple[int, int]) -> None:
    _, tp, pp = RUNS[name]
    uninterrupted = step_records(journeys.run(name))
    resharded, log = journeys.resumed(name, *target)
    reference, reference_log = journeys.resumed(name, tp, pp)  # the original layout, fresh moments too
    assert FRESH_MOMENTS in log and FRESH_MOMENTS in reference_log
    steps, expected = step_records(resharded), step_records(reference)
    assert sorted(steps) == sorted(expected) == list(range(SAVE_AT + 1, STEPS + 1)), (
        "resumes after the checkpoint"
    )
    first = SAVE_AT + 1
    assert steps[first]["loss"] == pytest.approx(uninterrupted[first]["loss"], **LOSS_TOL)
    # The moments did restart: the next step already parts from the uninterrupted run.
    assert steps[first + 1]["loss"] != pytest.approx(uninterrupted[first + 1]["loss"], rel=1e-3)
    assert steps[first]["lr"] == pytest.approx(uninterrupted[first]["lr"], rel=1e-6)
    for step in steps:
        assert steps[step]["loss"] == pytest.approx(expected[step]["loss"], **LOSS_TOL), step


def test_tp2_run_resharded_to_tp1_resumes_as_tp2_would(journeys):
    _assert_resumed_as_original_layout(journeys, "tp2", (1, 1))


def test_pp1_run_resharded_to_pp2_resumes_as_pp1_would(journeys):
    _assert_resumed_as_original_layout(journeys, "tp1", (1, 2))


# ------------------------------------------------------------------------------ upward reshard
@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)], ids=["tp1-to-tp2", "pp1-to-pp2"])
def test_upward_reshard_gives_the_same_loss_and_tokens(journeys, tp, pp):
    """From the end of the run: mid-way, the few-step model still says one token over and over."""
    before = journeys.outputs(journeys.run("tp1"), 1)
    assert len({token for row in before["tokens"] for token in row}) > 1, before["tokens"]
    resharded = journeys.resharded("tp1", tp, pp, step=STEPS)
    after = journeys.outputs(resharded, tp * pp)
    assert (after["tp"], after["pp"]) == (tp, pp)
    assert after["loss"] == pytest.approx(before["loss"], **LOSS_TOL)
    if pp > 1:  # a pipeline cannot generate: the resharded run read whole on one process
        after = journeys.outputs(resharded, 1, "model.llm.pp=1")
    assert after["tokens"] == before["tokens"]


def test_tp2_pp2_run_resharded_to_tp1_gives_the_same_loss_and_tokens(journeys):
    run = journeys.run("tp2-pp2")
    before = journeys.outputs(run, 4)  # the pipeline engine on the run's own 4 processes
    assert (before["tp"], before["pp"]) == (2, 2)
    resharded = _reshard(run, run.parent / "tp2-pp2-as-tp1", 1, 1)
    after = journeys.outputs(resharded, 1)
    assert (after["tp"], after["pp"]) == (1, 1)
    assert after["loss"] == pytest.approx(before["loss"], **LOSS_TOL)
    whole = journeys.outputs(run, 1, "model.llm.tp=1", "model.llm.pp=1")  # the original read whole
    assert after["tokens"] == whole["tokens"]


# ------------------------------------------------------------------------------ export
def _hf_outputs(export: Path, checkpoint: Path, sample) -> tuple[float, list[list[int]]]:
    """transformers' loss and greedy tokens (8 new) on what layout_outputs.py scores and captions."""
    import transformers

    from blip2_megatron.config import load_job_config
    from blip2_megatron.convert.hf_blip2 import hf_inputs_from_batch
    from blip2_megatron.convert.run_checkpoint import find_checkpoint
    from blip2_megatron.data.batch import build_batch_builder
    from blip2_megatron.data.processors import ImageEvalProcessor

    job = load_job_config(str(find_checkpoint(checkpoint) / "config.yaml"))
    hf = transformers.Blip2ForConditionalGeneration.from_pretrained(export).eval()
    val = json.loads((sample.root / "val.json").read_text())[:NUM_VAL]
    process = ImageEvalProcessor(job.model.vision.image_size)
    samples = {
        "image": torch.stack([process(sample.root / "images" / item["image"]) for item in val]),
        "text_input": [item["caption"][0] for item in val],
    }
    builder = build_batch_builder(job.model)
    prompt = builder.generation_inputs([job.model.prompt] * NUM_VAL)
    input_ids = prompt["input_ids"].masked_fill(prompt["image_slots"], hf.config.image_token_index)
    with torch.no_grad():
        loss = hf(**hf_inputs_from_batch(job.model, builder.tokenizer, samples, hf.config)).loss
        tokens = hf.generate(
            pixel_values=samples["image"],
            input_ids=input_ids,
            attention_mask=prompt["attention_mask"],
            do_sample=False,
            num_beams=1,
            max_new_tokens=8,
            min_new_tokens=8,
        )[:, input_ids.shape[1] :]
    return float(loss), tokens.tolist()


@pytest.mark.parametrize("name", ["pp2", "tp2-pp2"])
def test_pipeline_run_exports_to_transformers(journeys, sample, tmp_path, name):
    """The PP 2 run is the TP 1 run resumed at PP 2 (its checkpoint written by the pipeline engine)."""
    if name == "pp2":
        run, nproc = journeys.resumed("tp1", 1, 2)[0], 2
    else:
        run, nproc = journeys.run(name), 4
    export = tmp_path / "hf"
    launch("convert.py", "ours-to-hf", "--checkpoint", str(run), "--out", str(export))
    hf_loss, hf_tokens = _hf_outputs(export, run, sample)
    ours = journeys.outputs(run, nproc)  # the training engine in the run's own layout
    assert ours["pp"] == 2 and hf_loss == pytest.approx(ours["loss"], **LOSS_TOL)
    whole = journeys.outputs(run, 1, "model.llm.tp=1", "model.llm.pp=1")  # ours generates whole
    assert hf_tokens == whole["tokens"]
    assert len({token for row in hf_tokens for token in row}) > 1, "a caption, not one token repeated"
