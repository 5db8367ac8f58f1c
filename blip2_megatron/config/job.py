"""Job configuration: model flavour + overrides, data, training, evaluation.

A job YAML looks like::

    name: stage2_opt2.7b
    model: {flavour: blip2_opt2.7b, llm: {weights: /models/opt-2.7b, tp: 2}}
    data: {...}        # blip2_megatron.config.DataConfig
    train: {...}       # TrainConfig below
    eval: {...}        # EvalConfig below

:func:`load_job_config` reads it (or the embedded default), applies ``a.b=c`` overrides
from the command line and validates everything before any process group starts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from blip2_megatron.config.base import (
    ConfigError,
    check_choice,
    check_positive,
    from_dict,
    load_yaml,
    merge_dicts,
    parse_overrides,
    to_dict,
)
from blip2_megatron.config.data import DataConfig
from blip2_megatron.config.model import Blip2Config, build_model_config
from blip2_megatron.io import write_text_atomic

DEFAULT_JOB = "tiny_stage2"


@dataclass
class TrainConfig:
    """Optimisation, schedule, checkpointing and logging of a training job."""

    output_dir: str = ""  # run directory (log.jsonl, checkpoints/, config.yaml); "" = runs/<name>
    epochs: int = 1  # passes over the data (an epoch = data.samples_per_epoch or the dataset size)
    max_steps: int = 0  # optimizer steps to run; 0 = epochs x steps per epoch
    grad_accum: int = 0  # micro-batches per optimizer step; 0 = auto: 1, or 2 x model.llm.pp with pipelining
    lr: float = 1e-4  # peak learning rate (after warm-up)
    min_lr: float = 1e-5  # cosine floor
    warmup_lr: float = 1e-6  # learning rate at step 0
    warmup_steps: int = 0  # linear warm-up steps
    schedule: str = "cosine"  # "cosine" (per step), "cosine_epoch" (LAVIS: per epoch), "constant"
    weight_decay: float = 0.05  # AdamW decay; never on biases and 1-D parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas (paper: 0.98)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (LAVIS)
    precision: str = "fp32"  # "fp32", "bf16" or "fp16" (fp16 uses DeepSpeed loss scaling)
    seed: int = 42  # base seed; each data-parallel rank adds its rank
    log_interval: int = 10  # steps between log lines / JSONL records
    save_interval: int = 0  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones are deleted)
    resume: str = "auto"  # "auto" (latest in output_dir if any), "none", or a checkpoint directory
    warmup_log_steps: int = 2  # steps left out of the summary's mean FPS
    collective_timeout_s: int = 600  # a collective waiting longer (a lost rank) fails the job
    max_bad_steps: int = 10  # non-finite steps in a row (each skipped) that stop the job, after saving
    monitors: list[str] = field(default_factory=list)  # tracking: any of "tensorboard", "wandb", "csv"

    def __post_init__(self) -> None:
        check_choice("train.schedule", self.schedule, ("cosine", "cosine_epoch", "constant"))
        check_choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        check_positive("train.epochs", self.epochs)
        check_positive("train.grad_accum", self.grad_accum, allow_zero=True)
        check_positive("train.max_steps", self.max_steps, allow_zero=True)
        check_positive("train.lr", self.lr)
        check_positive("train.log_interval", self.log_interval)
        check_positive("train.keep_last", self.keep_last)
        check_positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("train.save_interval", self.save_interval, allow_zero=True)
        check_positive("train.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("train.collective_timeout_s", self.collective_timeout_s)
        check_positive("train.max_bad_steps", self.max_bad_steps)
        for index, name in enumerate(self.monitors):
            check_choice(f"train.monitors[{index}]", name, ("tensorboard", "wandb", "csv"))
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} must be two numbers in [0, 1)")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")


@dataclass
class EvalConfig:
    """Evaluation run after (or during) training, and by launch/evaluate.py."""

    enabled: bool = False  # evaluate at the end of training (launch/evaluate.py always evaluates)
    interval: int = 0  # also evaluate every N steps / epochs (eval.interval_unit) while training; 0 = never
    interval_unit: str = "steps"  # "steps" or "epochs" (LAVIS validates every epoch)
    keep_best: bool = True  # keep the checkpoint with the best agg_metric as `best` (never pruned)
    task: str = "caption"  # "caption" (pycocoevalcap), "vqa" (VQAv2 accuracy), "retrieval" (stage 1)
    split: str = "val"  # annotation split to evaluate
    max_samples: int = 0  # evaluate the first N samples only; 0 = all
    batch_size: int = 8  # images per device per generation batch
    num_beams: int = 5  # beam width (LAVIS caption/VQA: 5)
    max_new_tokens: int = 30  # caption: 30, VQA: 10
    min_new_tokens: int = 8  # caption: 8, VQA: 1
    prompt: str = ""  # caption prompt ("" = model.prompt); VQA: "Question: {} Short answer:"
    length_penalty: float = 1.0  # beam length penalty (VQA: -1 in LAVIS)
    repetition_penalty: float = 1.0  # > 1 discourages repeats
    k_test: int = 128  # retrieval: ITC candidates re-ranked by ITM
    require_spice: bool = False  # caption: fail when SPICE cannot run (no CoreNLP jars), not skip it
    precision: str = (
        "auto"  # compute dtype: "auto" (train.precision on GPU/NPU, fp32 on CPU), "fp32", "bf16", "fp16"
    )

    def __post_init__(self) -> None:
        check_choice("eval.task", self.task, ("caption", "vqa", "retrieval"))
        check_choice("eval.interval_unit", self.interval_unit, ("steps", "epochs"))
        check_choice("eval.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_positive("eval.interval", self.interval, allow_zero=True)
        check_positive("eval.batch_size", self.batch_size)
        check_positive("eval.num_beams", self.num_beams)
        check_positive("eval.max_new_tokens", self.max_new_tokens)
        check_positive("eval.min_new_tokens", self.min_new_tokens, allow_zero=True)
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"eval.min_new_tokens={self.min_new_tokens} exceeds eval.max_new_tokens={self.max_new_tokens}"
            )


@dataclass
class JobConfig:
    """A whole job: what to build, what to feed it, how to train and evaluate it."""

    name: str = DEFAULT_JOB  # job name (run directory name by default)
    flavour: str = "tiny"  # model flavour the model section overrides (see blip2_megatron.config.FLAVOURS)
    model: Blip2Config = field(default_factory=lambda: build_model_config("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if not self.train.output_dir:
            self.train.output_dir = str(Path("runs") / self.name)

    @property
    def tp(self) -> int:
        return self.model.llm.tp if self.model.llm is not None else 1

    @property
    def pp(self) -> int:
        return self.model.llm.pp if self.model.llm is not None else 1


def shipped_job_names() -> list[str]:
    """Job YAMLs shipped inside the package (blip2_megatron/configs/*.yaml)."""
    folder = resources.files("blip2_megatron") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _shipped_job_path(name: str) -> Path:
    return Path(str(resources.files("blip2_megatron") / "configs" / f"{name}.yaml"))


def _read_job_dict(config: str | None) -> dict[str, Any]:
    """The raw job dict from a path, a shipped job name, or the embedded default."""
    if config is None:
        config = DEFAULT_JOB
    path = Path(config)
    if not path.is_file():
        if config in shipped_job_names():
            path = _shipped_job_path(config)
        else:
            raise ConfigError(
                f"job config {config!r} is neither a file nor a shipped job; shipped jobs: {shipped_job_names()}"
            )
    data = load_yaml(path)
    base = data.pop("base", None)  # a job may extend another shipped job
    if base is not None:
        data = merge_dicts(_read_job_dict(base), data)
    return data


def job_config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Validate a job dict (model given as flavour + overrides) into a JobConfig."""
    data = copy.deepcopy(data)
    unknown = sorted(set(data) - {"name", "flavour", "model", "data", "train", "eval"})
    if unknown:
        raise ConfigError(
            f"unknown top-level config key(s) {unknown}; allowed: name, model, data, train, eval"
        )
    model = data.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError("model must be a mapping (flavour plus overrides)")
    flavour = model.pop("flavour", data.pop("flavour", "tiny"))
    data_image_size = (data.get("data") or {}).get("image_size")
    job = from_dict(JobConfig, data, prefix="")
    job.flavour = flavour
    job.model = build_model_config(flavour, model)
    # The model's input size is the truth; a data section that names another one is an error.
    if data_image_size is not None and int(data_image_size) != job.model.vision.image_size:
        raise ConfigError(
            f"data.image_size={data_image_size} differs from model.vision.image_size="
            f"{job.model.vision.image_size}; set them equal (or leave data.image_size out)"
        )
    job.data.image_size = job.model.vision.image_size
    _resolve_llm_dtype(job)
    _resolve_grad_accum(job)
    return job


def _resolve_grad_accum(job: JobConfig) -> None:
    """``train.grad_accum=0`` (auto) becomes 1 without pipelining and 2 x PP with it.

    Pipeline stages work at once only on different micro-batches: with one per step every
    stage idles while the others run. DeepSpeed's 1F1B schedule with m micro-batches over
    p stages idles (p - 1) / (m + p - 1) of the step; m = 2p makes that about a third at
    most (a fifth at PP 2) while keeping the global batch close to the PP 1 one. Activation
    memory does not grow with m (at most p micro-batches are in flight on a stage). An
    explicit value stays as given; the resolved number is what the saved config shows.
    """
    if job.train.grad_accum == 0:
        job.train.grad_accum = 2 * job.pp if job.pp > 1 else 1


def _resolve_llm_dtype(job: JobConfig) -> None:
    """``llm.dtype=auto`` becomes ``train.precision``; a frozen fp16 LLM needs fp16 training.

    Gradients reach the trained parts before the LLM (projection, Q-Former) back through all
    of its layers. In fp16 they underflow without loss scaling, which DeepSpeed applies only
    when the engine itself runs fp16 (bf16 has fp32's range and needs none).
    """
    llm = job.model.llm
    if llm is None:
        return
    if llm.dtype == "auto":
        llm.dtype = job.train.precision
    # A trained LLM runs in the engine's precision; a frozen one in its own dtype.
    runs_in_fp16 = llm.dtype == "fp16" or (not llm.freeze and job.train.precision == "fp16")
    if llm.is_encoder_decoder and runs_in_fp16:
        raise ConfigError(
            f"model.llm.dtype={llm.dtype} with train.precision={job.train.precision}: FlanT5 overflows in fp16 "
            "(it was trained in bf16; its activations exceed fp16's range), and no policy here keeps it "
            "finite; use bf16 (or fp32)"
        )
    if llm.freeze and llm.dtype == "fp16" and job.train.precision != "fp16":
        raise ConfigError(
            f"model.llm.dtype=fp16 with train.precision={job.train.precision}: gradients would flow back "
            "through the frozen fp16 LLM without loss scaling (DeepSpeed scales the loss only when "
            "train.precision=fp16); set model.llm.dtype=bf16 (or auto, which follows train.precision) "
            "or train.precision=fp16"
        )


def load_job_config(config: str | None = None, overrides: list[str] | None = None) -> JobConfig:
    """Read a job (path, shipped name, or the default), apply ``a.b=c`` overrides, validate."""
    data = _read_job_dict(config)
    data = merge_dicts(data, parse_overrides(overrides or []))
    return job_config_from_dict(data)


def job_config_to_dict(job: JobConfig) -> dict[str, Any]:
    """The resolved job as a plain dict: the full model section, so it stands alone."""
    out = to_dict(job)
    out["model"] = {"flavour": job.flavour, **out["model"]}
    out.pop("flavour", None)
    return out


def save_job_config(job: JobConfig, path: Path) -> None:
    """Write the resolved config (atomically: temp file then rename)."""
    write_text_atomic(yaml.safe_dump(job_config_to_dict(job), sort_keys=False), path)
