"""DeepSpeed JSON configs: read, fill the "auto" values from the job, check the layout.

``ds_configs/*.json`` leave batch sizes, accumulation, precision and clipping as "auto";
the job config is the one place those are set. The layout checks run before any process
group starts, so a bad combination fails at once with a plain message.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from blip2_megatron import accelerator
from blip2_megatron.config import ConfigError, JobConfig


def read_ds_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return data


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def check_layout(job: JobConfig, ds_config: dict[str, Any], world_size: int) -> int:
    """Validate TP x PP x DP against the world and ZeRO; return the data-parallel degree."""
    tp, pp = job.tp, job.pp
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not divisible by model.llm.tp x model.llm.pp = {tp} x {pp}"
        )
    stage = zero_stage(ds_config)
    if pp > 1 and stage > 1:
        raise ConfigError(
            f"ZeRO stage {stage} cannot be combined with pipeline parallelism (model.llm.pp={pp}): "
            "DeepSpeed's pipeline engine supports ZeRO 0 and 1 only; use ds_configs/zero1.json"
        )
    if stage == 3 and tp > 1:
        raise ConfigError(
            f"ZeRO stage 3 with tensor parallelism (model.llm.tp={tp}) is not supported: ZeRO-3 would "
            "partition the already-sharded tensor-parallel weights; use ZeRO-1/2 with TP, or TP=1 with ZeRO-3"
        )
    if pp > 1 and job.eval.interval:
        raise ConfigError(
            f"eval.interval with model.llm.pp={pp}: generation needs the whole model on a rank, which the "
            "pipeline stages never hold while training; evaluate saved checkpoints with launch/evaluate.py "
            "(any layout), or keep eval.enabled for the evaluation at the end"
        )
    if stage == 3 and job.eval.interval and world_size // (tp * pp) > 1:
        raise ConfigError(
            "eval.interval with ZeRO stage 3 over several data-parallel ranks: ZeRO-3 gathers each weight "
            "with a collective as it is used, and generation runs a different number of steps on each rank, "
            "so the ranks would wait on each other forever; use ZeRO-1/2 for periodic validation, or "
            "evaluate saved checkpoints with launch/evaluate.py"
        )
    if job.train.precision == "fp16" and "bf16" in str(ds_config.get("bf16", {}).get("enabled", "")).lower():
        raise ConfigError("ds_config enables bf16 while train.precision=fp16")
    return world_size // (tp * pp)


def _fill(node: Any, key: str, value: Any) -> None:
    if isinstance(node, dict) and node.get(key, "auto") == "auto":
        node[key] = value


def fill_ds_config(job: JobConfig, ds_config: dict[str, Any], dp_size: int) -> dict[str, Any]:
    """A copy of ``ds_config`` with every "auto" replaced by the job's value."""
    cfg = copy.deepcopy(ds_config)
    micro = job.data.batch_size
    accum = job.train.grad_accum
    _fill(cfg, "train_micro_batch_size_per_gpu", micro)
    _fill(cfg, "gradient_accumulation_steps", accum)
    _fill(cfg, "train_batch_size", micro * accum * dp_size)
    _fill(cfg, "gradient_clipping", job.train.grad_clip)
    expected = micro * accum * dp_size
    if cfg["train_batch_size"] != expected:
        raise ConfigError(
            f"ds_config train_batch_size={cfg['train_batch_size']} differs from data.batch_size x "
            f'train.grad_accum x DP = {micro} x {accum} x {dp_size} = {expected}; set it to "auto"'
        )
    cfg.setdefault("bf16", {})
    cfg.setdefault("fp16", {})
    if autocasts_trained_vision(job) and "torch_autocast" not in cfg:
        # Parameters stay fp32; matmuls run in half precision under torch.autocast (fp16
        # with ZeRO's gradient scaler), as LAVIS trains its ViT with AMP.
        half = {"bf16": "bfloat16", "fp16": "float16"}[job.train.precision]
        cfg["torch_autocast"] = {"enabled": True, "dtype": half}
        _fill(cfg["bf16"], "enabled", False)
        _fill(cfg["fp16"], "enabled", False)
    _fill(cfg["bf16"], "enabled", job.train.precision == "bf16")
    _fill(cfg["fp16"], "enabled", job.train.precision == "fp16")
    if job.pp > 1:
        _fill_pipeline(cfg)
    zero = cfg.setdefault("zero_optimization", {"stage": 0})
    hidden = job.model.llm.hidden_size if job.model.llm is not None else job.model.qformer.hidden_size
    _fill(zero, "reduce_bucket_size", hidden * hidden)
    _fill(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
    _fill(zero, "stage3_param_persistence_threshold", 10 * hidden)
    leftover = [k for k, v in _walk(cfg) if v == "auto"]
    if leftover:
        raise ConfigError(f'ds_config keys left as "auto" that the job cannot fill: {leftover}')
    return cfg


def autocasts_trained_vision(job: JobConfig) -> bool:
    """Whether a half-precision job trains through torch.autocast with fp32 parameters.

    So it does when the ViT trains (caption fine-tuning). DeepSpeed's bf16 / fp16 engine
    casts every trained parameter to half precision, which would put a trained ViT's
    LayerNorms, CLS and position embeddings, and with them its residual stream (kept in the
    position embedding's dtype: ``models/vision.py``), in bf16; the caption job trains the
    ViT in fp32, as LAVIS does with AMP. Under autocast the parameters stay fp32, matmuls
    run in half precision and norms in fp32. Frozen parts keep their own dtypes either way.
    """
    return job.train.precision != "fp32" and not job.model.vision.freeze


def without_idle_zero(ds_config: dict[str, Any], dp_size: int, precision: str) -> dict[str, Any]:
    """The config DeepSpeed runs: ZeRO-1/2 become stage 0 at one data-parallel rank on CPU in fp32.

    ZeRO-1/2 partition optimizer states (and gradients) over the data-parallel ranks; with
    one rank nothing is partitioned, yet DeepSpeed's ZeRO optimizer still keeps flat fp32
    copies of the trained weights and copies every gradient into buckets from backward
    hooks (measured on CPU, tiny job at fp32: backward 18.7 ms under ZeRO-2, 12.1 ms
    without). The step is the same computation either way.

    Only there (:func:`drops_idle_zero`). In bf16 or fp16 DeepSpeed's stage 0 wraps a
    torch optimizer in its unfused fp16 optimizer, whose overflow check reads every trained
    tensor on the host (about 730 waits per step for the caption job on a GPU), and the
    trainer must check each loss itself (another wait per micro-batch), while ZeRO's
    optimizer checks all gradients at once. Offloading needs ZeRO and keeps its stage, as
    does ZeRO-3. Checkpoints record the stage DeepSpeed ran (its files differ by stage):
    one written by ZeRO-2 at one rank resumes under stage 0 from its saved weights.
    """
    zero = ds_config.get("zero_optimization", {})
    offloads = zero.get("cpu_offload") is True or any(
        (zero.get(key) or {}).get("device", "none") != "none"
        for key in ("offload_optimizer", "offload_param")
    )
    if dp_size > 1 or zero_stage(ds_config) not in (1, 2) or offloads or not drops_idle_zero(precision):
        return ds_config
    cfg = copy.deepcopy(ds_config)
    cfg["zero_optimization"]["stage"] = 0
    return cfg


def drops_idle_zero(precision: str) -> bool:
    """Whether ZeRO-1/2 at one data-parallel rank run as stage 0 here: on CPU in fp32 only, where measured faster."""
    return precision == "fp32" and accelerator.is_cpu()


def _fill_pipeline(cfg: dict[str, Any]) -> None:
    """Turn off DeepSpeed's TP-partitioned activations between stages (on by default).

    With them each TP rank sends 1/TP of an activation and the receiver re-assembles it from
    metadata cached at the first micro-batch; captions vary in length, so later activations
    have other shapes and the re-assembly fails (measured: an all-gather size error at TP 2 x
    PP 2). Shapes are exchanged per micro-batch instead (the pipeline module's dynamic_shape).
    """
    pipeline = cfg.setdefault("pipeline", {})
    for key in ("pipe_partitioned", "grad_partitioned"):
        if pipeline.get(key, "auto") is True:
            raise ConfigError(
                f"ds_config pipeline.{key}=true cannot run with variable-length captions (DeepSpeed caches "
                "the first micro-batch's activation shapes for it); remove it or set it to false"
            )
        pipeline[key] = False


def _walk(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix, node
