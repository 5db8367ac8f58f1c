"""Assembly: a config becomes a model with its weights (the only place that does both).

Where starting weights come from:

* ``model.init_checkpoint``: comma-separated sources for the vision encoder, Q-Former,
  queries, projection (and stage-1 heads): a Hugging Face Blip2 or InstructBlip directory,
  LAVIS ``.pth`` files (``blip2_pretrained.pth``, ``blip2_pretrained_opt2.7b.pth``,
  ``eva_vit_g.pth``, InstructBLIP's ``instruct_blip_vicuna7b_trimmed.pth``),
  MiniGPT-4 checkpoints (their ``llama_proj`` is our projection), a safetensors file with
  our own names, or a run directory of ours (LAVIS's stage-1 ->
  stage-2 hand-off: the run's base weights, then what it trained). Later sources override
  earlier ones; parts the model does not have (a stage-1 Q-Former's text layers in a
  stage-2 model) are skipped.
* ``model.llm.weights``: a Hugging Face OPT / LLaMA directory, read shard by shard for this
  rank's tensor-parallel slice and pipeline stage. A Hugging Face Blip2 directory in
  ``init_checkpoint`` also supplies the LLM when ``llm.weights`` is empty.
* ``trained``: a checkpoint of one of our runs, saved in any TP x PP layout, loaded last.

The model remembers which parameters came from files (``base_weight_names``): a training
checkpoint stores everything else, so a randomly initialised frozen part is never lost.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config, ConfigError, JobConfig, load_job_config
from blip2_megatron.convert.hf_blip2 import (
    HF_LLM_PREFIX,
    PROJECTION_PREFIX,
    check_hf_blip2_checkpoint,
    hf_blip2_model_config,
    is_instructblip_dir,
)
from blip2_megatron.convert.hf_llm import (
    llm_config_from_hf,
    load_hf_llm_weights,
    read_dequantized_dir,
    read_hf_config,
)
from blip2_megatron.convert.run_checkpoint import (
    CONFIG,
    WEIGHTS,
    RunWeights,
    find_checkpoint,
    load_run_weights,
    read_trainer_state,
    run_dir_of,
)
from blip2_megatron.convert.vision_qformer import (
    PATCH_ENCODER_PREFIX,
    QUERY_ENCODER_PREFIX,
    hf_vision_qformer_to_ours,
    lavis_to_ours,
    load_into,
)
from blip2_megatron.data.batch import BatchBuilder, LLMBatchBuilder, build_batch_builder
from blip2_megatron.inference import Blip2Predictor
from blip2_megatron.io import load_state_dict_file
from blip2_megatron.models.blip2 import Blip2ForLLM, Blip2PipeStage
from blip2_megatron.models.flops import pipeline_partition
from blip2_megatron.models.llm import ParallelCausalLM
from blip2_megatron.models.quantize import quantize_llm
from blip2_megatron.models.stage1 import Blip2Stage1
from blip2_megatron.parallel import state
from blip2_megatron.parallel.pipeline import PipelineStage

logger = logging.getLogger(__name__)

# LAVIS / MiniGPT-4 names of the query -> LLM projection.
LAVIS_PROJECTION_PREFIXES = ("opt_proj.", "llm_proj.", "llama_proj.", "t5_proj.")


# ------------------------------------------------------------------------------ sources
def _sources(cfg: Blip2Config) -> list[Path]:
    return [Path(p.strip()) for p in cfg.init_checkpoint.split(",") if p.strip()]


@dataclass
class _InitialWeights:
    """What the ``init_checkpoint`` sources give, in order: our-named tensors, and where the LLM comes from.

    ``llm`` is the last source that holds an LLM: ``("hf", path or HF-named tensors)`` or
    ``("run", checkpoint directory)`` (a run that saved its LLM: trained or randomly
    initialised); ``model.llm.weights`` overrides it.
    """

    ours: dict[str, torch.Tensor] = field(default_factory=dict)
    llm: tuple[str, Any] | None = None


def _collect_run(path: Path, cfg: Blip2Config, weights: _InitialWeights) -> None:
    """A run of ours: its own base weights first, then what it saved."""
    checkpoint = find_checkpoint(path)
    base = read_trainer_state(checkpoint).get("base_weights", {})
    for source in [p.strip() for p in (base.get("init_checkpoint") or "").split(",") if p.strip()]:
        _collect(Path(source), cfg, weights)
    if base.get("llm"):
        weights.llm = ("hf", base["llm"])
    saved = RunWeights(checkpoint / WEIGHTS)
    for name in saved.keys():
        if not name.startswith(HF_LLM_PREFIX):
            weights.ours[name] = saved.read(name)
    if any(name.startswith(HF_LLM_PREFIX) for name in saved.keys()):
        weights.llm = ("run", checkpoint)
    logger.info("initial weights from run checkpoint %s", checkpoint)


def _image_path_prefix(cfg: Blip2Config) -> str:
    """Where the ViT (+ Q-Former) sits in the model: ``query_encoder.`` or, without a Q-Former, ``patch_encoder.``."""
    return PATCH_ENCODER_PREFIX if cfg.image_encoder == "patches" else QUERY_ENCODER_PREFIX


def _collect(path: Path, cfg: Blip2Config, weights: _InitialWeights) -> None:
    """Add one init_checkpoint source (a run, a HF Blip2 directory or a weight file) to ``weights``.

    The ViT lands under the model's image path (:func:`_image_path_prefix`), so a LAVIS
    ``eva_vit_g.pth`` or a Hugging Face Blip2 directory fills a model without a Q-Former
    too (its Q-Former tensors, if any, are then parts the model does not have).
    """
    if not path.exists():
        raise FileNotFoundError(f"model.init_checkpoint: {path} does not exist")
    prefix = _image_path_prefix(cfg)
    if path.is_dir() and find_checkpoint(path) is not None:
        _collect_run(path, cfg, weights)
    elif path.is_dir():
        raw = read_dequantized_dir(path)
        ours, rest = hf_vision_qformer_to_ours(raw, prefix=prefix, instructblip=is_instructblip_dir(path))
        weights.ours.update(ours)
        weights.ours.update({k: raw[k] for k in rest if k.startswith(PROJECTION_PREFIX)})
        llm = {k[len(HF_LLM_PREFIX) :]: raw[k] for k in rest if k.startswith(HF_LLM_PREFIX)}
        if llm:
            weights.llm = ("hf", llm)
    else:
        raw = load_state_dict_file(path)
        if any(k.startswith((QUERY_ENCODER_PREFIX, PATCH_ENCODER_PREFIX)) for k in raw):  # already our names
            weights.ours.update(raw)
            return
        ours, rest = lavis_to_ours(raw, prefix=prefix, num_vision_layers=cfg.vision.num_layers)
        weights.ours.update(ours)
        for key in rest:
            for prefix in LAVIS_PROJECTION_PREFIXES:
                if key.startswith(prefix):
                    weights.ours[PROJECTION_PREFIX + key[len(prefix) :]] = raw[key]
    logger.info("initialised from %s", path)


def _without_llm(model: nn.Module) -> nn.Module:
    """A view of ``model`` without ``language_model`` (loaded separately, shard by shard)."""
    view = nn.Module()
    for name, child in model.named_children():
        if name != "language_model":
            view.add_module(name, child)
    for name, param in model.named_parameters(recurse=False):
        view.register_parameter(name, param)
    return view


def collect_initial_weights(cfg: Blip2Config) -> _InitialWeights:
    """What ``init_checkpoint`` and ``llm.weights`` give (the LLM as a source to read, not yet read)."""
    weights = _InitialWeights()
    for source in _sources(cfg):
        _collect(source, cfg, weights)
    if cfg.llm is not None and cfg.llm.weights:
        weights.llm = ("hf", cfg.llm.weights)
    return weights


def load_initial_weights(
    model: nn.Module, cfg: Blip2Config, weights: _InitialWeights | None = None
) -> set[str]:
    """Load ``init_checkpoint`` and ``llm.weights`` into ``model`` (one pipeline stage of it).

    ``weights``: what :func:`collect_initial_weights` found (collected here when not given).
    Returns the names of the parameters that came from files.
    """
    weights = weights if weights is not None else collect_initial_weights(cfg)
    target = _without_llm(model)
    own = set(target.state_dict())
    # Parts that live on other pipeline stages (or that this model kind lacks: a stage-1
    # Q-Former's text layers in a stage-2 model) are not this model's business.
    mine = {k: v for k, v in weights.ours.items() if k in own}
    from_files = set(mine) - set(load_into(target, mine).skipped) if mine else set()
    language_model = getattr(model, "language_model", None)
    if language_model is not None and weights.llm is not None:
        kind, source = weights.llm
        if kind == "hf":
            load_hf_llm_weights(language_model, source)
        else:
            tp_rank, tp_size = (state.tp_rank(), state.tp_size()) if state.is_initialized() else (0, 1)
            load_run_weights(model, source / WEIGHTS, tp_rank, tp_size, prefix=HF_LLM_PREFIX)
        from_files |= {HF_LLM_PREFIX + name for name, _ in language_model.named_parameters()}
    return from_files & {name for name, _ in model.named_parameters()}


# ------------------------------------------------------------------------------ models
def build_model(
    cfg: Blip2Config,
    device: torch.device | str | None = None,
    stage: PipelineStage | None = None,
    trained: str | Path | None = None,
) -> nn.Module:
    """The model ``cfg`` describes (this rank's TP shard / pipeline stage), weights loaded, frozen parts frozen.

    ``stage``: the parts of one pipeline stage (default the whole model). ``trained`` is a
    run or checkpoint directory of ours whose saved tensors are loaded last (any layout:
    this rank reads its own slice).

    A frozen LLM is built in ``llm.dtype`` (:func:`llm_weight_dtype`); a trained one in fp32
    (the engine casts it and keeps an fp32 master copy). An LLM whose weights come from
    files is created on the meta device, placed uninitialised on ``device`` in that dtype,
    and filled with this rank's slice of each tensor, read straight from the files: no
    host-side fp32 copy of the model, no random initialisation that is overwritten.

    ``llm.quantize`` (int8 / nf4): the LLM is loaded on the host and its linear layers are
    quantized one by one onto ``device`` (``models/quantize.py``), so the device never
    holds the dense LLM.
    """
    weights = collect_initial_weights(cfg)
    quantize = cfg.llm.quantize if cfg.llm is not None else "none"
    if cfg.kind == "stage1":
        model: nn.Module = Blip2Stage1(cfg)
    else:
        llm_on_meta = weights.llm is not None
        model = Blip2ForLLM(
            cfg,
            stage=stage,
            llm_dtype=llm_weight_dtype(cfg),
            llm_device="meta" if llm_on_meta else None,
        )
        if llm_on_meta and model.language_model is not None:
            _materialize(model.language_model, device if device is not None and quantize == "none" else "cpu")
    model.base_weight_names = frozenset(
        load_initial_weights(model, cfg, weights)
    )  # frozen parts keep their dtype
    if trained is not None:
        load_trained_weights(model, trained)
    if quantize != "none" and getattr(model, "language_model", None) is not None:
        _quantize_llm_of(model, quantize, device)
    if device is not None:
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.2fM parameters, %.2fM trainable", cfg.kind, total / 1e6, trainable / 1e6)
    return model


def _quantize_llm_of(model: nn.Module, mode: str, device: torch.device | str | None) -> None:
    """Quantize ``model``'s LLM; an LLM read from files still counts as read from files.

    Its layers' parameters get new names (``...q_proj.quantized.weight``): without this a
    checkpoint would store the packed weights, which no run could load back.
    """

    def llm_names() -> set[str]:
        return {HF_LLM_PREFIX + name for name, _ in model.language_model.named_parameters()}

    from_files = llm_names() <= model.base_weight_names
    quantize_llm(model.language_model, mode, device)
    if from_files:
        model.base_weight_names = model.base_weight_names | llm_names()


def _materialize(module: nn.Module, device: torch.device | str) -> None:
    """Give a meta-device module uninitialised storage on ``device`` (``to_empty``), keeping
    the attributes megatron-core marks its parameters with (``partition_dim`` ...), which
    the new parameter objects would otherwise lack."""
    marks = {name: dict(vars(param)) for name, param in module.named_parameters()}
    module.to_empty(device=device)
    for name, param in module.named_parameters():
        for key, value in marks[name].items():
            setattr(param, key, value)


def llm_weight_dtype(cfg: Blip2Config) -> torch.dtype:
    """The dtype the LLM is built in: ``llm.dtype`` when frozen (fp16 falls back to fp32 on
    CPU), fp32 when trained (the engine casts it to its precision)."""
    return accelerator.weight_dtype(cfg.llm.weight_dtype_name) if cfg.llm.freeze else torch.float32


def load_trained_weights(model: nn.Module, trained: str | Path) -> list[str]:
    """Load a run's saved tensors into ``model`` (whole or a stage, any TP size)."""
    checkpoint = find_checkpoint(trained)
    if checkpoint is None:
        raise FileNotFoundError(f"{trained} holds no finished checkpoint (no trainer_state.json / latest)")
    required = [name for name, p in model.named_parameters() if p.requires_grad]
    tp_rank, tp_size = (state.tp_rank(), state.tp_size()) if state.is_initialized() else (0, 1)
    return load_run_weights(model, checkpoint / WEIGHTS, tp_rank, tp_size, required=required)


def build_llm_from_hf(
    model_dir: str | Path,
    pre_process: bool = True,
    post_process: bool = True,
    layer_range: tuple[int, int] | None = None,
    params_dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> ParallelCausalLM:
    """A :class:`ParallelCausalLM` (stage) built from a Hugging Face directory with its weights."""
    cfg = llm_config_from_hf(read_hf_config(model_dir), weights=str(model_dir), **config_overrides)
    model = ParallelCausalLM(cfg, pre_process, post_process, layer_range, params_dtype, init_weights=False)
    load_hf_llm_weights(model, model_dir)
    return model


def build_pipeline_stage(
    cfg: Blip2Config,
    stage: int,
    num_stages: int,
    device: torch.device | str | None = None,
    trained: str | Path | None = None,
) -> Blip2PipeStage:
    """Pipeline stage ``stage`` of ``num_stages``: the parts :func:`pipeline_partition` gives it."""
    if cfg.llm is None:
        raise ConfigError(
            "pipeline parallelism splits the LLM; stage-1 models have none (set model.llm.pp=1)"
        )
    parts = pipeline_partition(cfg, num_stages)[stage]
    model = build_model(cfg, device=device, stage=parts, trained=trained)
    return Blip2PipeStage(model, stage, num_stages)


def build_from_hf_blip2(
    model_dir: str | Path, device: torch.device | str | None = None, **overrides: Any
) -> tuple[Blip2ForLLM, Blip2Config, LLMBatchBuilder]:
    """``(model in eval mode, its config, batch builder)`` from a local transformers Blip2 / InstructBlip directory.

    The tokenizer is read from the same directory (or ``llm.tokenizer``). ``overrides`` are
    Blip2Config fields, dotted or nested (``**{"llm.tp": 2}``, ``prompt=""``). Model-parallel
    groups are started (TP = ``llm.tp``, PP = 1) unless running; when running, ``llm.tp``
    follows them.
    """
    model_dir = Path(model_dir)
    tp = state.tp_size() if state.is_initialized() else None
    cfg = hf_blip2_model_config(model_dir, overrides, tp=tp)
    if cfg.llm.pp != 1:
        raise ConfigError("a transformers Blip2 directory loads whole on each rank: llm.pp must be 1")
    if not state.is_initialized():
        state.initialize_model_parallel(cfg.llm.tp, 1)
    check_hf_blip2_checkpoint(model_dir, cfg)
    builder = build_batch_builder(cfg)
    model = build_model(cfg, device=device)
    model.eval()
    logger.info(
        "loaded a transformers %s (%s, %d layers) from %s",
        "InstructBlip" if cfg.instruction_aware else "Blip2",
        cfg.llm.arch,
        cfg.llm.num_layers,
        model_dir,
    )
    return model, cfg, builder


# ------------------------------------------------------------------------------ inference
def inference_config(cfg: Blip2Config, world_size: int, tp: int | None = None) -> Blip2Config:
    """``cfg`` laid out for generation on ``world_size`` ranks: the whole LLM per rank (PP = 1).

    Without an explicit ``tp``, the model is split over as many TP ranks as it was split
    over TP x PP ranks in training (so each rank holds the share of the weights it held
    then), as far as the world size and the attention heads allow.
    """
    llm = cfg.llm
    if llm is None:
        return cfg
    if tp is None:
        split = llm.tp * llm.pp
        tp = next(
            t
            for t in range(split, 0, -1)
            if split % t == 0 and world_size % t == 0 and llm.num_heads % t == 0 and llm.kv_heads % t == 0
        )
    return dataclasses.replace(cfg, llm=dataclasses.replace(llm, tp=tp, pp=1))


def predictor_for(
    model: nn.Module,
    cfg: Blip2Config,
    builder: BatchBuilder | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Blip2Predictor:
    """A text-level predictor (generate / predict_answers / retrieval features) around ``model``."""
    return Blip2Predictor(model, cfg, builder or build_batch_builder(cfg), compute_dtype)


def load_trained_model(
    checkpoint: str | Path | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    device: torch.device | str | None = None,
) -> tuple[Blip2Predictor, JobConfig, Path | None]:
    """``(predictor in eval mode, job config, run dir)`` for evaluation, prediction and export.

    ``checkpoint`` is a run or checkpoint directory of ours, saved in any TP x PP layout;
    without it, ``config`` (a job) gives a model with its initial weights. The model is
    laid out by :func:`inference_config` unless the overrides set ``model.llm.tp``.
    """
    overrides = list(overrides or [])
    ckpt = None
    run_dir = None
    if checkpoint:
        ckpt = find_checkpoint(checkpoint)
        if ckpt is None:
            raise FileNotFoundError(
                f"{checkpoint} holds no finished checkpoint (no trainer_state.json / latest)"
            )
        run_dir = run_dir_of(ckpt)
        config = config or str(ckpt / CONFIG)
    job = load_job_config(config, overrides)
    env = state.init_distributed()
    tp_override = next((int(o.split("=", 1)[1]) for o in overrides if o.startswith("model.llm.tp=")), None)
    job.model = inference_config(job.model, env.world_size, tp=tp_override)
    state.initialize_model_parallel(job.tp, 1)
    accelerator.manual_seed(job.train.seed)  # randomly initialised parts equal on every rank
    model = build_model(job.model, device=device or accelerator.current_device(), trained=ckpt)
    model.eval()
    compute_dtype = accelerator.inference_dtype(job.eval.precision, job.train.precision)
    return predictor_for(model, job.model, compute_dtype=compute_dtype), job, run_dir
