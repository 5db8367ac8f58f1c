"""Helpers for the journey tests: run ``launch/*.py`` the way users do, read what the runs wrote.

Every journey goes through the real entry points (``deepspeed launch/train.py ...``,
``python launch/evaluate.py ...``) in subprocesses, on the built-in dataset, and reads the
files the runs leave behind (``log.jsonl``, ``summary.json``, ``eval/``, checkpoints).
:func:`tiny_overrides` turns a shipped job into its tiny-size variant: the same job (model
kind, frozen parts, prompt / template, relative image size, data format, schedule kind)
with the tiny flavour of its own LLM family (:func:`tiny_flavour_for`), built-in tokenizers and
the built-in data in the job's data format.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from dist_utils import launcher_free_env

from blip2_megatron.parallel.state import free_port

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
DS_CONFIGS = REPO / "ds_configs"
# The tiny ViT has 8-pixel patches at 32 px; a job's larger input keeps its ratio (364 / 224).
TINY_IMAGE_SIZE = {224: 32, 364: 48, 32: 32}
TINY_MAX_BATCH = 8
TINY_MAX_POSITIONS = 512
# LLM family (LLMConfig.hf_family) -> its tiny flavour in blip2_megatron/config/model.py.
TINY_FLAVOURS = {
    "opt": "tiny",
    "llama": "tiny_llama",
    "qwen2": "tiny_qwen2",
    "mistral": "tiny_mistral",
    "internlm2": "tiny_internlm2",
    "t5": "tiny_flant5",
}
# The same for instruction-aware (InstructBLIP) jobs, whose Q-Former reads the instruction.
TINY_INSTRUCT_FLAVOURS = {"llama": "tiny_instructblip_llama", "t5": "tiny_instructblip_flant5"}


def env(**extra: str) -> dict[str, str]:
    return launcher_free_env(
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra
    )


def launch(
    script: str, *args: str, nproc: int = 0, timeout: int = 600, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess:
    """Run ``launch/<script>`` with ``python`` (``nproc=0``) or the DeepSpeed launcher (``nproc`` ranks)."""
    path = str(LAUNCH / script)
    if nproc:
        command = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), path, *args]
    else:
        command = [sys.executable, path, *args]
    proc = subprocess.run(
        command, env=env(), input=input, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def train_job(
    config: str, run: Path, *overrides: str, nproc: int = 1, timeout: int = 900
) -> subprocess.CompletedProcess:
    """``launch/train.py --config <config>`` under the DeepSpeed launcher with ZeRO-2, writing to ``run``."""
    return launch(
        "train.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        "--config",
        config,
        f"train.output_dir={run}",
        *overrides,
        nproc=nproc,
        timeout=timeout,
    )


def piped_chat(model: Path | str, image: str, questions: list[str]) -> subprocess.CompletedProcess:
    """``launch/chat.py`` on ``model`` and ``image`` with ``questions`` piped in, one per line."""
    return launch(
        "chat.py",
        "--model",
        str(model),
        "--image",
        image,
        "--max-new-tokens",
        "8",
        input="\n".join(questions) + "\n",
    )


def records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "log.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def step_records(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Step -> the last record logged for it (a resumed run logs its steps again)."""
    return {r["step"]: r for r in records(run_dir) if "event" not in r}


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def tiny_flavour_for(job: Any) -> str:
    """The tiny flavour with ``job``'s own architecture: stage 1's, or its LLM family's.

    Only the flavour changes: the job's YAML-level model settings (kind, image encoder,
    prompts, template, end symbol, frozen parts, TP / PP) still apply over it, as they do
    over the job's own flavour.
    """
    if job.model.llm is None:
        return "tiny_stage1"
    family = job.model.llm.hf_family
    flavours, table = (
        (TINY_INSTRUCT_FLAVOURS, "TINY_INSTRUCT_FLAVOURS")
        if job.model.instruction_aware
        else (TINY_FLAVOURS, "TINY_FLAVOURS")
    )
    if family not in flavours:
        raise KeyError(
            f"job {job.name!r} has an LLM of family {family!r}, which has no tiny flavour; add one to "
            f"blip2_megatron/config/model.py and to journeys.{table} (known: {sorted(flavours)})"
        )
    return flavours[family]


def tiny_overrides(job_name: str, sample: Any) -> list[str]:
    """``key=value`` overrides that make shipped job ``job_name`` run at tiny size on the built-in data."""
    from blip2_megatron.config import load_job_config

    job = load_job_config(job_name)
    data = job.data
    overrides = [
        f"model.flavour={tiny_flavour_for(job)}",
        "model.init_checkpoint=",
        "model.qformer.tokenizer=builtin:tiny",
        "model.llm.weights=",
        "model.llm.tokenizer=builtin:tiny",
        # The built-in tokenizer spells words outside its small vocabulary letter by letter, so a
        # job's instruction and caption take several times the tokens they take with the real one.
        f"model.llm.max_position_embeddings={TINY_MAX_POSITIONS}",
        f"model.vision.image_size={TINY_IMAGE_SIZE[job.model.vision.image_size]}",
        f"data.batch_size={min(data.batch_size, TINY_MAX_BATCH)}",
        "data.num_workers=1",
        f"data.vqa_questions={sample.vqa_questions}",
        f"data.vqa_annotations={sample.vqa_annotations}",
        f"data.vqa_image_template={sample.vqa_image_template}",
        f"data.val_annotation={sample.val_annotation}",
        f"data.test_annotation={sample.test_annotation}",
        f"data.val_gt={sample.val_gt}",
        f"data.test_gt={sample.test_gt}",
    ]
    if data.kind == "wds" and data.source_tasks:  # each source the built-in one of its task
        by_task = {
            "caption": sample.train_shards,
            "vqa": sample.vqa_train_shards,
            "conversation": sample.conversation_shards,
        }
        sources = [by_task[task] for task in data.source_tasks]
        overrides.append(f"data.train_shards={json.dumps(sources)}")
    elif data.kind == "wds":
        sources = [sample.train_shards, sample.extra_shards][: len(data.train_shards)]
        overrides.append(f"data.train_shards={json.dumps(sources)}")
    elif data.kind == "coco":
        overrides += [
            f"data.train_annotation={sample.coco_train_annotation}",
            f"data.image_root={sample.image_root}",
        ]
    elif data.kind == "cc_sbu_align":
        overrides += [
            f"data.train_annotation={sample.cc_sbu_align_annotation}",
            f"data.image_root={sample.cc_sbu_align_annotation.parent / 'image'}",
        ]
    else:
        overrides += [f"data.sample_root={sample.root}", f"data.image_root={sample.image_root}"]
    if data.kind != "cc_sbu_align":
        overrides.append(f"data.image_root={sample.image_root}")
    return overrides
