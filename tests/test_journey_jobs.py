"""Every shipped job runs as written, at tiny size on the built-in data (``journeys.tiny_overrides``).

Each job keeps its own settings (model kind, frozen parts, prompt / template, relative image
size, data format and mixing, precision, schedule) and its own architecture: the tiny flavour
of its LLM family (OPT, LLaMA, Qwen2, Mistral, InternLM2; ``journeys.tiny_flavour_for``) with
that family's maths flags, in the job's TP x PP layout. Only the sizes, weights, tokenizers and
data paths become tiny. Training jobs train a few steps through ``launch/train.py`` under the
DeepSpeed launcher (and evaluate where the job evaluates), and the run's saved config says
which architecture trained; the evaluation-only jobs run through ``launch/evaluate.py``.
The README's own commands train most shipped jobs this way already (``test_readme.py``, with
the same settings check): here run the rest.
"""

from __future__ import annotations

import json

import pytest
import yaml
from journeys import (
    DS_CONFIGS,
    TINY_IMAGE_SIZE,
    launch,
    step_records,
    summary,
    tiny_flavour_for,
    tiny_overrides,
)

from blip2_megatron.config import load_job_config, shipped_job_names

pytestmark = [pytest.mark.slow, pytest.mark.journey]

# Zero-shot jobs only evaluate (launch/evaluate.py). Evaluated here and, for InternLM2, in
# test_llm_families.py (after training its stage-2 job with a real InternLM2 directory).
EVAL_ONLY = {name for name in shipped_job_names() if name.startswith("vqa_zeroshot_")}
# Jobs whose own journey trains or evaluates them at tiny size, with more checks than here.
OWN_JOURNEY = {"instruct_vicuna7b", "vqa_zeroshot_instructblip_vicuna7b"}  # test_journey_instructblip.py
EVALUATED_HERE = sorted(EVAL_ONLY - OWN_JOURNEY - {"vqa_zeroshot_internlm2_1.8b"})


def readme_trained_jobs() -> set[str]:
    """Shipped jobs a README command trains at tiny size or benchmarks (test_readme.py runs them)."""
    from test_readme import readme_commands

    jobs = set()
    for command in readme_commands():
        words = command.split()
        if "launch/train.py" in words or "launch/benchmark.py" in words:
            jobs.add(words[words.index("--config") + 1] if "--config" in words else "tiny_stage2")
    return jobs


TRAINING_JOBS = [
    name for name in shipped_job_names() if name not in EVAL_ONLY | OWN_JOURNEY | readme_trained_jobs()
]


def llm_architecture(job) -> dict:
    """The LLM's family and the maths flags that make it that family, independent of its size."""
    llm = job.model.llm
    if llm is None:
        return {}
    return {
        "llm.family": llm.hf_family,
        "llm.arch": llm.arch,
        "llm.attention_bias": llm.attention_bias,
        "llm.o_proj_bias": llm.has_o_proj_bias,
        "llm.tie_word_embeddings": llm.tie_word_embeddings,
        "llm.grouped_query_attention": llm.kv_heads < llm.num_heads,
        "llm.rope_type": llm.rope_type,
        "llm.sliding_window": llm.sliding_window > 0,
    }


def model_settings(job) -> dict:
    """What makes a job what it is, independent of model size."""
    m = job.model
    text = (
        {}
        if m.kind == "stage1"
        else {  # a stage-1 model has no LLM text layout
            "prompt": m.prompt,
            "prompt_template": m.prompt_template,
            "end_sym": m.end_sym,
            "max_txt_len": m.max_txt_len,
        }
    )
    return {
        "kind": m.kind,
        **text,
        **llm_architecture(job),
        "image_encoder": m.image_encoder,
        "instruction_aware": m.instruction_aware,
        "freeze_qformer": m.freeze_qformer,
        "vision.freeze": m.vision.freeze,
        "vision.grad_checkpointing": m.vision.grad_checkpointing,
        "llm.freeze": None if m.llm is None else m.llm.freeze,
        "data.kind": job.data.kind,
        "data.sources": len(job.data.train_shards),
        "data.mix_weights": job.data.mix_weights,
        "data.source_tasks": job.data.source_tasks,
        "data.instruction_templates": job.data.instruction_templates,
        "train.precision": job.train.precision,
        "train.schedule": job.train.schedule,
    }


def test_the_readme_and_this_file_train_every_shipped_job():
    assert set(TRAINING_JOBS) | readme_trained_jobs() | EVAL_ONLY | OWN_JOURNEY == set(shipped_job_names())


@pytest.mark.parametrize("name", TRAINING_JOBS)
def test_shipped_job_trains_at_tiny_size_with_its_own_settings(name, sample, tmp_path):
    run = tmp_path / name
    overrides = [
        *tiny_overrides(name, sample),
        f"train.output_dir={run}",
        "train.max_steps=3",
        "train.log_interval=1",
        "train.save_interval=0",
        "eval.max_samples=4",
        "eval.num_beams=2",
    ]
    real, tiny = load_job_config(name), load_job_config(name, overrides)
    nproc = real.tp * real.pp if real.tp * real.pp > 1 else 0  # a TP / PP job needs that many ranks
    launch(
        "train.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        "--config",
        name,
        *overrides,
        nproc=nproc,
        timeout=600,
    )
    ran = load_job_config(str(run / "config.yaml"))
    assert model_settings(ran) == model_settings(real) == model_settings(tiny)
    # It trained as its own architecture, in its own layout.
    assert ran.flavour == tiny_flavour_for(real)
    assert (ran.model.llm is None) == (real.model.llm is None)
    if real.model.llm is not None:
        assert ran.model.llm.hf_family == real.model.llm.hf_family
    assert (ran.tp, ran.pp) == (real.tp, real.pp)
    assert (
        ran.model.vision.image_size == TINY_IMAGE_SIZE[real.model.vision.image_size]
    )  # the same relative size
    assert sorted(step_records(run)) == [1, 2, 3]
    stats = summary(run)
    assert stats["precision"] == real.train.precision and stats["data_sources"] == max(
        len(real.data.train_shards), 1
    )
    if real.eval.enabled:
        assert stats["num_evaluated"] == 4, stats


def test_a_llama_family_job_trains_with_tensor_parallelism():
    """stage2_vicuna7b ships with llm.tp=2: its tiny journey above trains a LLaMA on 2 TP ranks."""
    real = load_job_config("stage2_vicuna7b")
    assert "stage2_vicuna7b" in TRAINING_JOBS
    assert (real.model.llm.hf_family, real.model.llm.arch, real.tp, real.pp) == ("llama", "llama", 2, 1)


def test_every_shipped_job_has_a_tiny_flavour_of_its_own_family(sample):
    for name in shipped_job_names():
        real = load_job_config(name)
        if real.flavour.startswith("tiny"):
            continue  # already tiny (the tiny jobs and the benchmark shapes)
        tiny = load_job_config(name, tiny_overrides(name, sample))
        assert tiny.flavour == tiny_flavour_for(real) and tiny.flavour.startswith("tiny"), name
        assert llm_architecture(tiny) == llm_architecture(real), name


@pytest.mark.parametrize("name", EVALUATED_HERE)
def test_evaluation_only_job_runs_and_scores_by_answer_type(name, sample, tmp_path):
    out = tmp_path / "vqa"
    overrides = [*tiny_overrides(name, sample), "eval.max_samples=16", "eval.num_beams=2"]
    # evaluate.py resolves the same command line into the model it evaluates (it saves no config).
    real, tiny = load_job_config(name), load_job_config(name, overrides)
    assert tiny.flavour == tiny_flavour_for(real)
    assert llm_architecture(tiny) == llm_architecture(real)
    launch("evaluate.py", "--config", name, "--output", str(out), *overrides)
    metrics = json.loads((out / "eval" / "metrics_vqa.json").read_text())
    assert metrics["num_evaluated"] == 16
    assert {"overall", "yes/no", "number", "other"} <= set(metrics)
    answers = json.loads((out / "eval" / "vqa_answers.json").read_text())
    assert len(answers) == 16 and all(isinstance(a["answer"], str) for a in answers)


def test_evaluation_with_every_image_missing_fails_and_says_why(sample, tmp_path):
    name = "vqa_zeroshot_opt2.7b"
    proc = launch(
        "evaluate.py",
        "--config",
        name,
        "--output",
        str(tmp_path / "vqa"),
        *tiny_overrides(name, sample),
        f"data.image_root={tmp_path / 'nowhere'}",
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "nothing to score" in proc.stderr and "600 missing image" in proc.stderr


def test_every_shipped_job_names_its_settings_in_its_yaml():
    """Kind, frozen parts and image size are the job's, not its flavour's: a tiny variant keeps them."""
    from importlib import resources

    from blip2_megatron.config import merge_dicts

    def read(name: str) -> dict:
        raw = yaml.safe_load((resources.files("blip2_megatron") / "configs" / f"{name}.yaml").read_text())
        base = raw.pop("base", None)
        return merge_dicts(read(base), raw) if base else raw

    for name in shipped_job_names():
        model = read(name)["model"]
        assert "kind" in model, f"{name}.yaml names no model.kind"
        if not model["flavour"].startswith("tiny"):
            assert "vision" in model and "freeze" in model["vision"], f"{name}.yaml names no vision.freeze"
