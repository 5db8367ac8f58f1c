"""Parameters, memory and FLOPs per model part and per tensor/pipeline-parallel rank, without memory.

The model is built on the meta device (shapes only, no storage) in a single process with
TP = 1; what each TP rank and pipeline stage holds is then derived from the parameters'
own tensor-parallel marks (megatron-core's ``tensor_model_parallel`` / ``partition_dim``)
and from :func:`blip2_megatron.models.flops.pipeline_partition`, so the numbers
follow the code that really splits the model:

* a split parameter holds ``1 / tp`` of its partition dimension on each rank; the token
  embedding and the head hold ``ceil(vocab / tp)`` rows (the vocabulary is padded to a
  multiple of TP);
* norms, OPT's position table and row-parallel biases are whole on every TP rank;
* each stage holds its ViT blocks (the first one the patch and position embeddings), the
  bridge stage ``ln_vision``, the Q-Former and queries, the projection and the token
  (+ position) embeddings; the last stage the final norm and the head (an OPT head tied
  to the embedding needs its own copy when the two are on different stages).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from blip2_megatron.config import Blip2Config, ConfigError
from blip2_megatron.parallel.pipeline import PipelineStage

LLM_PREFIX = "language_model."
VOCAB_PARAMS = ("embed_tokens.weight", "lm_head.weight")  # rows are vocabulary entries
# Part name -> parameter-name prefixes, in report order.
PARTS: dict[str, tuple[str, ...]] = {
    "ViT": ("query_encoder.visual_encoder.", "patch_encoder.visual_encoder."),
    "Q-Former (+queries)": ("query_encoder.qformer.", "query_encoder.query_tokens"),
    "projection": ("language_projection.",),
    "LLM": (LLM_PREFIX,),
    "stage-1 heads": ("vision_proj.", "text_proj.", "itm_head.", "temp", "lm_head."),
}


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Build modules with shapes but no storage (``torch.device("meta")``)."""
    with torch.device("meta"):
        yield


def build_meta_model(cfg: Blip2Config) -> nn.Module:
    """The whole model of ``cfg`` on the meta device (frozen parts frozen), for names and shapes.

    Needs model-parallel groups whose TP size equals ``cfg.llm.tp`` (the LLM checks it).
    """
    from blip2_megatron.models.blip2 import Blip2ForLLM
    from blip2_megatron.models.stage1 import Blip2Stage1

    with meta_device():
        if cfg.kind == "stage1":
            return Blip2Stage1(cfg)
        return Blip2ForLLM(cfg)


# ------------------------------------------------------------------------------ report
@dataclass
class PartCount:
    """Parameters of one part of the model."""

    total: int = 0
    trainable: int = 0

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass
class StageCount:
    """What one pipeline stage holds on each of its TP ranks."""

    stage: int
    layers: tuple[int, int]  # decoder layers [start, end)
    holds: list[str]  # the parts besides decoder layers
    vision_blocks: tuple[int, int] | None = None  # ViT blocks [start, end); None: none
    params_per_tp_rank: int = 0
    trainable_per_tp_rank: int = 0
    state_bytes_per_tp_rank: int = 0  # weights, gradients and Adam state (see :func:`state_bytes`)
    train_flops_per_sample: float = 0.0  # models.flops.stage_train_flops


@dataclass
class ParamReport:
    """Parameter counts of one model config at one TP x PP layout."""

    name: str
    kind: str
    tp: int
    pp: int
    parts: dict[str, PartCount] = field(default_factory=dict)
    stages: list[StageCount] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(p.total for p in self.parts.values())

    @property
    def trainable(self) -> int:
        return sum(p.trainable for p in self.parts.values())

    @property
    def flops_ratio(self) -> float:
        """The costliest stage's training FLOPs over the cheapest's (1 without pipelining)."""
        flops = [s.train_flops_per_sample for s in self.stages]
        return max(flops) / min(flops) if flops and min(flops) > 0 else 1.0


def part_of(name: str) -> str:
    """The report part a parameter name belongs to."""
    for part, prefixes in PARTS.items():
        if any(name == p or (p.endswith(".") and name.startswith(p)) for p in prefixes):
            return part
    raise ValueError(f"parameter {name} belongs to no known part of the model")


def per_tp_rank(name: str, param: torch.Tensor, tp: int, vocab_size: int | None) -> int:
    """Elements of ``param`` (built with TP = 1) that one of ``tp`` ranks holds."""
    dim = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
    if dim is None:
        return param.numel()
    shape = list(param.shape)
    if name.endswith(VOCAB_PARAMS) and vocab_size is not None:
        shape[dim] = math.ceil(vocab_size / tp)
    elif shape[dim] % tp:
        raise ConfigError(f"{name}: dimension {dim} of {tuple(param.shape)} does not divide by tp={tp}")
    else:
        shape[dim] //= tp
    return math.prod(shape)


DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
TRAINED_BYTES = 16  # fp32 weight, fp32 gradient, Adam's two fp32 moments


def state_bytes(cfg: Blip2Config, name: str, count: int, trainable: bool) -> int:
    """Bytes ``count`` elements of parameter ``name`` take on a GPU in training, activations aside.

    Trained: :data:`TRAINED_BYTES` per element (unpartitioned: ZeRO divides the gradient and
    Adam state by the DP size; bf16/fp16 training adds a 2-byte copy). Frozen: the dtype the
    weights are kept in (``vision.frozen_dtype``, ``llm.dtype``).
    """
    if trainable:
        return count * TRAINED_BYTES
    if name.startswith(LLM_PREFIX) and cfg.llm is not None:
        return count * DTYPE_BYTES[cfg.llm.weight_dtype_name]
    if part_of(name) == "ViT":
        return count * DTYPE_BYTES[cfg.vision.frozen_dtype]
    return count * 4


def _holdings(cfg: Blip2Config, stage: PipelineStage, num_vision_blocks: int) -> list[str]:
    """The parts a stage holds besides its decoder layers, in forward order."""
    holds = []
    if stage.vision_blocks is not None:
        start, end = stage.vision_blocks
        holds.append("ViT" if (start, end) == (0, num_vision_blocks) else f"ViT blocks {start}-{end - 1}")
    if stage.has_bridge:
        holds += [] if cfg.image_encoder == "patches" else ["Q-Former (+queries)"]
        if cfg.llm is not None:
            holds += ["projection", "token embeddings"]
            if cfg.llm.is_encoder_decoder:
                holds += [f"encoder layers 0-{cfg.llm.num_layers - 1}"]
    if stage.has_head and cfg.llm is not None:
        holds += ["final norm", "head"]
    if cfg.kind == "stage1":
        holds += ["stage-1 heads"]
    return holds


def count_parameters(
    cfg: Blip2Config, tp: int | None = None, pp: int | None = None, name: str = ""
) -> ParamReport:
    """Parameter counts of ``cfg`` per part and per TP/PP rank, computed on the meta device.

    ``tp`` / ``pp`` default to the config's ``llm.tp`` / ``llm.pp`` (a stage-1 model has no
    LLM and is counted whole). Needs model-parallel
    groups with TP = 1 (``state.initialize_model_parallel(1, 1)``; started here if none).
    """
    from blip2_megatron.models.flops import pipeline_partition, stage_train_flops
    from blip2_megatron.parallel import state
    from blip2_megatron.parallel.pipeline import stage_of

    if not state.is_initialized():
        state.initialize_model_parallel(1, 1)
    if state.tp_size() != 1:
        raise RuntimeError("count_parameters builds the model with TP = 1; run it in a single process")
    llm = cfg.llm
    if llm is None:
        tp = pp = 1  # only the LLM is split; a stage-1 model is whole on every rank
    else:
        tp, pp = tp or llm.tp, pp or llm.pp
        # Validates tp against the heads and pp against the layers, as a real run would.
        replace(llm, tp=tp, pp=pp)
        cfg = replace(cfg, llm=replace(llm, tp=1, pp=1))
    model = build_meta_model(cfg)

    vision_blocks = cfg.vision.num_layers
    if llm is not None:
        partition = pipeline_partition(cfg, pp)
    else:
        partition = [PipelineStage.whole(vision_blocks, 0)]
    report = ParamReport(name=name, kind=cfg.kind, tp=tp, pp=pp, parts={p: PartCount() for p in PARTS})
    for index, stage in enumerate(partition):
        report.stages.append(
            StageCount(
                stage=index,
                layers=stage.llm_layers,
                holds=_holdings(cfg, stage, vision_blocks),
                vision_blocks=stage.vision_blocks,
            )
        )

    vocab = llm.vocab_size if llm is not None else None
    for param_name, param in model.named_parameters():
        part = report.parts[part_of(param_name)]
        part.total += param.numel()
        part.trainable += param.numel() if param.requires_grad else 0
        stage = report.stages[stage_of(param_name, partition)]
        if param_name.startswith(LLM_PREFIX):
            count = per_tp_rank(param_name[len(LLM_PREFIX) :], param, tp, vocab)
        else:
            count = param.numel()
        stage.params_per_tp_rank += count
        stage.trainable_per_tp_rank += count if param.requires_grad else 0
        stage.state_bytes_per_tp_rank += state_bytes(cfg, param_name, count, param.requires_grad)

    bridge = next(i for i, s in enumerate(partition) if s.has_bridge)
    if llm is not None and llm.tie_word_embeddings and bridge != len(partition) - 1:
        # The head reads the embedding on one stage; split over stages it keeps a copy.
        embedding = model.language_model.embed_tokens.weight
        copy = per_tp_rank("embed_tokens.weight", embedding, tp, vocab)
        report.stages[-1].params_per_tp_rank += copy
        report.stages[-1].trainable_per_tp_rank += copy if embedding.requires_grad else 0
        report.stages[-1].state_bytes_per_tp_rank += state_bytes(
            cfg, LLM_PREFIX + "lm_head.weight", copy, embedding.requires_grad
        )
    if llm is not None:
        for stage, flops in zip(report.stages, stage_train_flops(cfg, partition)):
            stage.train_flops_per_sample = flops / tp  # every split matmul divides by TP
    return report


# ------------------------------------------------------------------------------ output
def human(count: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def human_bytes(count: int) -> str:
    """1536 -> '1.50 KiB'."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def format_report(report: ParamReport) -> str:
    """The report as an aligned table (parts, then per-rank figures)."""
    lines = [f"{report.name or 'model'} (kind {report.kind}, tp={report.tp}, pp={report.pp})"]
    lines.append(f"  {'part':<22}{'params':>16}{'':>9}{'trainable':>16}{'frozen':>16}")
    rows: list[tuple[str, PartCount]] = [(k, v) for k, v in report.parts.items() if v.total]
    rows.append(("total", PartCount(report.total, report.trainable)))
    for part, count in rows:
        lines.append(
            f"  {part:<22}{count.total:>16,}{human(count.total):>9}{count.trainable:>16,}{count.frozen:>16,}"
        )
    lines.append(f"  per rank ({report.tp} TP rank(s) per pipeline stage, each holding the same count):")
    for stage in report.stages:
        start, end = stage.layers
        layers = [f"decoder layers {start}-{end - 1}"] if end > start else []
        # In forward order: ViT blocks and bridge, then decoder layers, then the head.
        before = [h for h in stage.holds if h not in ("final norm", "head", "stage-1 heads")]
        held = before + layers + stage.holds[len(before) :]
        flops = (
            f", {stage.train_flops_per_sample / 1e9:,.4g} GFLOP/sample"
            if stage.train_flops_per_sample
            else ""
        )
        lines.append(
            f"    stage {stage.stage}: {stage.params_per_tp_rank:,} ({human(stage.params_per_tp_rank)}), "
            f"{stage.trainable_per_tp_rank:,} trainable; {human_bytes(stage.state_bytes_per_tp_rank)}"
            f"{flops}; {', '.join(held)}"
        )
    if len(report.stages) > 1:
        lines.append(f"  costliest / cheapest stage: {report.flops_ratio:.3f}x training FLOPs")
    lines.append(
        "  bytes: weights, gradients and Adam state on a GPU (frozen parts in their kept dtype, trained "
        f"{TRAINED_BYTES} B/param before ZeRO), activations aside; GFLOP: training, per sample of "
        "image slots + max_txt_len tokens; PP stages are balanced by it over ViT blocks, the bridge "
        "(Q-Former, projection), decoder layers and the head"
    )
    return "\n".join(lines)


def report_dict(report: ParamReport) -> dict[str, Any]:
    """JSON-ready form of a report."""
    return {
        "name": report.name,
        "kind": report.kind,
        "tp": report.tp,
        "pp": report.pp,
        "total": report.total,
        "trainable": report.trainable,
        "flops_ratio": report.flops_ratio,
        "parts": {k: {"total": v.total, "trainable": v.trainable} for k, v in report.parts.items()},
        "stages": [
            {
                "stage": s.stage,
                "layers": list(s.layers),
                "vision_blocks": list(s.vision_blocks) if s.vision_blocks is not None else None,
                "holds": s.holds,
                "params_per_tp_rank": s.params_per_tp_rank,
                "trainable_per_tp_rank": s.trainable_per_tp_rank,
                "state_bytes_per_tp_rank": s.state_bytes_per_tp_rank,
                "train_flops_per_sample": s.train_flops_per_sample,
            }
            for s in report.stages
        ],
    }


# ------------------------------------------------------------------------------ quantized inference
@dataclass
class InferenceMemory:
    """Weight memory of a model loaded for inference on one device (TP 1), activations aside.

    ``peak_bytes``: every weight at rest plus the largest transient of loading. Unquantized,
    the LLM is filled in place (no transient). Quantized, its linear layers go to the device
    one at a time and are quantized there: one dense copy of the largest layer meets its
    quantized result (fp16 for int8, which bitsandbytes quantizes from fp16; the kept dtype
    for nf4).
    """

    quantize: str
    llm_bytes: int
    other_bytes: int
    peak_bytes: int


def _llm_bytes_and_transient(cfg: Blip2Config, mode: str) -> tuple[int, int]:
    from blip2_megatron.models.quantize import quantized_layer_names, quantized_linear_bytes

    llm = cfg.llm
    dtype_bytes = DTYPE_BYTES[llm.weight_dtype_name]
    language_model = build_meta_model(
        replace(cfg, llm=replace(llm, tp=1, pp=1, quantize="none"))
    ).language_model
    quantized = set(quantized_layer_names(language_model)) if mode != "none" else set()
    total = transient = 0
    for name, module in language_model.named_modules():
        if name in quantized:
            out_features, in_features = module.weight.shape
            total += quantized_linear_bytes(out_features, in_features, mode, dtype_bytes)
            total += module.bias.numel() * dtype_bytes if module.bias is not None else 0
            transient = max(transient, module.weight.numel() * (2 if mode == "int8" else dtype_bytes))
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            total += tensor.numel() * dtype_bytes
    return total, transient


def llm_weight_bytes(cfg: Blip2Config, mode: str | None = None) -> int:
    """Bytes of the LLM's parameters, buffers and quantization statistics on one device (TP 1).

    ``mode`` defaults to ``cfg.llm.quantize``. Computed from the model on the meta device;
    equal to :func:`blip2_megatron.models.quantize.weight_bytes` of the built model.
    """
    return _llm_bytes_and_transient(cfg, mode or cfg.llm.quantize)[0]


def inference_memory(cfg: Blip2Config, mode: str | None = None) -> InferenceMemory:
    """:class:`InferenceMemory` of ``cfg`` with the LLM quantized as ``mode`` (default ``llm.quantize``)."""
    mode = mode or cfg.llm.quantize
    llm_bytes, transient = _llm_bytes_and_transient(cfg, mode)
    model = build_meta_model(replace(cfg, llm=replace(cfg.llm, tp=1, pp=1, quantize="none")))
    other = sum(
        state_bytes(cfg, name, param.numel(), trainable=False)
        for name, param in model.named_parameters()
        if not name.startswith(LLM_PREFIX)
    )
    return InferenceMemory(mode, llm_bytes, other, llm_bytes + other + transient)
