"""The training engine: the one place that sets DeepSpeed up (its ``initialize``), for any layout.

:func:`build_engine` applies parallelism from outside in one fixed order: megatron-core's
groups must already be running (``state.initialize_model_parallel``); the model is built
for this rank's TP shard (and pipeline stage when PP > 1) by ``blip2_megatron.build``;
then DeepSpeed wraps it, as a ZeRO data-parallel engine over megatron-core's groups
(PP = 1, through the ``mpu`` adapter) or as a ``PipelineEngine`` whose own grid must equal
megatron-core's (PP > 1). :class:`Engine` runs one optimizer step on batches from the
batch builder, the same way for training and the benchmark.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from blip2_megatron import accelerator
from blip2_megatron.build import build_model, build_pipeline_stage
from blip2_megatron.config import ConfigError, JobConfig
from blip2_megatron.convert.run_checkpoint import unwrap_stage
from blip2_megatron.data.batch import IGNORE_INDEX
from blip2_megatron.models.blip2 import Blip2PipeStage
from blip2_megatron.models.flops import pipeline_partition, train_flops_by_part
from blip2_megatron.parallel import state
from blip2_megatron.parallel.mpu import MegatronMpu
from blip2_megatron.parallel.pipeline import PipelineStage, check_grid_matches_megatron
from blip2_megatron.training.ds_config import fill_ds_config, without_idle_zero, zero_stage
from blip2_megatron.training.faults import EXIT_NON_FINITE, TrainingStopped
from blip2_megatron.training.optim import WarmupCosineSchedule, build_optimizer
from blip2_megatron.training.throughput import StepTiming, add_flops, batch_lengths

logger = logging.getLogger(__name__)

Batch = dict[str, Any]


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Tensors of ``batch`` on ``device`` (other values as they are)."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def pipeline_inputs(batch: Batch) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """An LLM batch as the pipeline engine reads it: (first-stage inputs, last-stage labels)."""
    inputs = (batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_slots"].long())
    return inputs, batch["labels"]


class _StageSpec(LayerSpec):
    """A pipeline stage built by the assembly layer, only on the ranks of that stage."""

    def __init__(self, job: JobConfig, stage: int, device: torch.device, trained: Path | None):
        super().__init__(Blip2PipeStage)
        self.job, self.stage, self.device, self.trained = job, stage, device, trained

    def build(self, log: bool = False) -> Blip2PipeStage:
        return build_pipeline_stage(self.job.model, self.stage, self.job.pp, self.device, self.trained)

    def __repr__(self) -> str:
        return f"Blip2PipeStage({self.stage} of {self.job.pp})"


class _Blip2PipelineModule(PipelineModule):
    """DeepSpeed's PipelineModule with OPT's tied embedding / head shared across stages.

    DeepSpeed ties weights it builds through ``TiedLayerSpec``; ours are inside whole
    stages, so the pair is named here: the first stage's token embedding and the last
    stage's head copy, over megatron-core's embedding group. The engine sums their
    gradients over that group before each optimizer step (``get_tied_weights_and_groups``),
    so both copies take the same steps, as the single tied weight of an unsplit model does.
    A trained tied embedding therefore stays on stage 0 (``models/flops.py``
    ``embedding_stays_on_first_stage``); a frozen one may sit on a later stage (with the
    bridge), and its copies need only start equal.
    """

    partition: list[PipelineStage]  # what each stage holds (set by build_pipeline_module)

    def _language_model(self) -> nn.Module | None:
        return unwrap_stage(self.forward_funcs[0]).language_model

    def tied_embedding(self) -> tuple[torch.Tensor, Any] | None:
        group = state.embedding_group()
        lm = self._language_model()
        if group is None or lm is None or not lm.tie_word_embeddings or not self.partition[0].has_bridge:
            return None
        weight = lm.embed_tokens.weight if lm.pre_process else lm.lm_head.weight
        return weight, group

    def get_tied_weights_and_groups(self) -> list[tuple[torch.Tensor, Any]]:
        tied = self.tied_embedding()
        return super().get_tied_weights_and_groups() + ([tied] if tied else [])

    @torch.no_grad()
    def synchronize_tied_embedding(self) -> None:
        """Copy the token embedding into the last stage's head copy (they may start apart).

        From stage 0 over the embedding group; from a later bridge stage (a frozen LLM)
        point to point, since the embedding group holds the first and last stages only.
        """
        tied = self.tied_embedding()
        if tied is not None:
            weight, group = tied
            first = min(torch.distributed.get_process_group_ranks(group))
            torch.distributed.broadcast(weight, src=first, group=group)
            return
        lm = self._language_model()
        bridge = next(index for index, stage in enumerate(self.partition) if stage.has_bridge)
        last = len(self.partition) - 1
        if lm is None or not lm.tie_word_embeddings or bridge in (0, last):
            return
        ranks = sorted(torch.distributed.get_process_group_ranks(state.pp_group()))  # in stage order
        if state.pp_rank() == bridge:
            torch.distributed.send(lm.embed_tokens.weight, dst=ranks[last])
        elif state.pp_rank() == last:
            torch.distributed.recv(lm.lm_head.weight, src=ranks[bridge])


def build_pipeline_module(
    job: JobConfig, device: torch.device, trained: Path | None = None
) -> PipelineModule:
    """DeepSpeed PipelineModule over our stages (only this rank's stage is built).

    What each stage holds comes from ``models.flops.pipeline_partition`` (ViT blocks, the
    bridge, decoder layers, the head). ``dynamic_shape``: captions vary in length, so the
    activations a stage sends vary from micro-batch to micro-batch; without it the engine
    would reuse the first batch's shapes.
    """
    topology = PipeModelDataParallelTopology(num_pp=job.pp, num_mp=job.tp, num_dp=state.dp_size())
    check_grid_matches_megatron(topology)
    specs = [_StageSpec(job, stage, device, trained) for stage in range(job.pp)]
    module = _Blip2PipelineModule(
        layers=specs, topology=topology, partition_method="uniform", loss_fn=None, dynamic_shape=True
    )
    module.partition = pipeline_partition(job.model, job.pp)
    module.loss_fn = module.forward_funcs[0].loss
    module.synchronize_tied_embedding()
    return module


class _PipelineBatches:
    """Loader batches as the (inputs, labels) pairs the pipeline engine pulls, timed and counted."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, count_flops: Any):
        self.batches = batches
        self.device = device
        self.count_flops = count_flops
        self.data_time = 0.0

    def __iter__(self) -> _PipelineBatches:
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        start = time.perf_counter()
        batch = next(self.batches)
        self.count_flops(batch)
        batch = to_device(batch, self.device)
        self.data_time += time.perf_counter() - start
        return pipeline_inputs(batch)


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (one small all-reduce: all ranks must agree to skip)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())


def _zero_gradient_loss(module: nn.Module) -> torch.Tensor:
    """A loss whose gradients are exact zeros for every trainable parameter (a dropped micro-batch)."""
    return sum((p.sum() * 0.0 for p in module.parameters() if p.requires_grad), torch.zeros(()))


def _check_quantized_llm(job: JobConfig) -> None:
    """A quantized LLM trains through (frozen) only where ``build_model`` quantizes it: no pipeline."""
    llm = job.model.llm
    if llm is not None and llm.quantize != "none" and job.pp > 1:
        raise ConfigError(
            f"model.llm.quantize={llm.quantize} with model.llm.pp={job.pp}: pipeline stages are not quantized; "
            "train through a quantized LLM with pp=1 (TP and DP are fine)"
        )


def _check_quantized_llm_comes_from_files(module: nn.Module, job: JobConfig) -> None:
    """A checkpoint stores the parameters no base weight file holds; a quantized LLM's packed
    weights cannot be loaded back, so its weights must come from files."""
    language_model = getattr(module, "language_model", None)
    if language_model is None or job.model.llm.quantize == "none":
        return
    from_files = getattr(module, "base_weight_names", frozenset())
    if any(f"language_model.{name}" not in from_files for name, _ in language_model.named_parameters()):
        raise ConfigError(
            f"model.llm.quantize={job.model.llm.quantize} quantizes an LLM that does not come from files "
            "(random weights): its checkpoints would hold packed weights no run can load back; give "
            "model.llm.weights (or an init_checkpoint that holds the LLM), or train without quantization"
        )


def _add_flops(total: dict[str, float], cfg: Any, batch: Batch) -> None:
    targets = None
    if cfg.llm is not None and cfg.llm.is_encoder_decoder:  # the decoder's tokens: its labels
        targets = (batch["labels"] != IGNORE_INDEX).sum(dim=1).tolist()
    instruction = batch.get("qformer_attention_mask")  # InstructBLIP: the Q-Former reads text too
    instruction_lengths = None if instruction is None else instruction.sum(dim=1).tolist()
    add_flops(
        total,
        train_flops_by_part(
            cfg, batch_lengths(batch), batch.get("first_label", 0), targets, instruction_lengths
        ),
    )


@dataclass
class StepResult:
    """What one optimizer step did.

    ``losses`` stay on the device (reading them would wait for the step to finish): the
    trainer reads them at log steps only.
    """

    losses: dict[str, torch.Tensor]  # this DP rank's mean over the step's micro-batches; empty when skipped
    timing: StepTiming
    skipped: bool  # non-finite loss (or fp16 overflow): nothing was applied
    flops: dict[str, float]  # training FLOPs of this rank's batches by model part (real token counts)


@dataclass
class Engine:
    """A DeepSpeed engine (ZeRO or pipeline) with our optimizer, schedule and step function.

    ``model`` is this rank's BLIP-2 module: the whole model (PP = 1) or its pipeline stage's
    part; ``ds`` the DeepSpeed engine around it.
    """

    ds: Any
    scheduler: WarmupCosineSchedule
    model: nn.Module
    job: JobConfig

    @property
    def pipeline(self) -> bool:
        return self.job.pp > 1

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage DeepSpeed runs (may differ from the ds_config's: see ``without_idle_zero``)."""
        return int(self.ds.zero_optimization_stage())

    @functools.cached_property
    def optimizer_skips_non_finite(self) -> bool:
        """Whether DeepSpeed's optimizer checks the gradients and skips a non-finite step itself.

        ZeRO's optimizers do in fp16, in bf16 (``bf16.check_grad_overflow``, on by default),
        under torch autocast (fp32 parameters: ZeRO-1/2 read the global norm) and whenever
        gradient clipping is on (a non-finite norm); fp16 without ZeRO has its loss scaler.
        Then :meth:`step` need not read the loss on the host before backward, a wait that
        would stall the device queue at every micro-batch.
        """
        ds = self.ds
        if ds.fp16_enabled():
            return True
        if self.zero_stage == 0:
            return False
        if ds.torch_autocast_enabled() and self.zero_stage in (1, 2) and ds.zero_compute_grad_norm():
            return True  # fp32 parameters: ZeRO-1/2 skip a step whose global gradient norm is not finite
        return bool(ds.bfloat16_enabled() and ds._config.bfloat16_config.check_grad_overflow) or (
            ds.gradient_clipping() > 0
        )

    def step(self, batches: Iterator[Batch], sync_timing: bool = False) -> StepResult:
        """One optimizer step (all its micro-batches): this DP rank's mean losses, timing, skipped or not.

        A non-finite loss on any rank skips the step on every rank before anything is
        applied (no optimizer step, the LR schedule does not advance, as Megatron skips a
        step): DeepSpeed's optimizer skips it where it checks the gradients
        (:attr:`optimizer_skips_non_finite`); elsewhere the loss is checked on every rank
        before backward, and with gradient accumulation a non-finite micro-batch after
        the first is dropped (its gradients are zeros). Nothing here waits for the device
        unless that check runs or ``sync_timing`` asks for an exact per-phase breakdown.
        """
        if self.pipeline:
            return self._pipeline_step(batches)
        timing, flops = StepTiming(), {}
        sums: dict[str, torch.Tensor] = {}
        device = accelerator.current_device()
        accum = self.job.train.grad_accum
        overflows_before = self.ds.skipped_steps
        check_loss = not self.optimizer_skips_non_finite
        sync = accelerator.synchronize if sync_timing else (lambda: None)
        skipped = False
        for index in range(accum):
            start = time.perf_counter()
            batch = next(batches)
            _add_flops(flops, self.job.model, batch)
            batch = to_device(batch, device)
            timing.data += time.perf_counter() - start
            if skipped:
                continue  # the step is skipped: its remaining micro-batches are consumed, not run

            start = time.perf_counter()
            losses = self.ds(batch)
            sync()
            timing.forward += time.perf_counter() - start
            loss = losses["loss"]
            if check_loss and not _finite_on_every_rank(loss):
                if index == 0:
                    skipped = True
                    continue
                loss = _zero_gradient_loss(self.ds.module)  # drop this micro-batch, keep the step

            start = time.perf_counter()
            self.ds.backward(loss)
            sync()
            timing.backward += time.perf_counter() - start

            start = time.perf_counter()
            self.ds.step()
            sync()
            timing.optimizer += time.perf_counter() - start
            for name, value in losses.items():
                value = value.detach().float()
                sums[name] = sums[name] + value if name in sums else value
        skipped = skipped or self.ds.skipped_steps > overflows_before
        losses = {} if skipped else {k: v / accum for k, v in sums.items()}
        return StepResult(losses, timing, skipped, flops)

    def _pipeline_step(self, batches: Iterator[Batch]) -> StepResult:
        """One pipeline step. The pipeline engine itself waits for the device (it exchanges
        each micro-batch's activation shapes as tensors), so the loss is read here."""
        flops: dict[str, float] = {}
        feed = _PipelineBatches(
            batches, accelerator.current_device(), lambda b: _add_flops(flops, self.job.model, b)
        )
        overflows_before = self.ds.skipped_steps
        start = time.perf_counter()
        loss_tensor = self.ds.train_batch(data_iter=feed)
        loss = float(loss_tensor)
        total = time.perf_counter() - start
        timing = StepTiming(data=feed.data_time, forward=total - feed.data_time)
        if self.ds.skipped_steps > overflows_before:
            # DeepSpeed skipped it (fp16 / bf16 overflow check)
            return StepResult({}, timing, skipped=True, flops=flops)
        if not math.isfinite(loss):
            # The pipeline engine runs backward and the optimizer step inside train_batch;
            # in fp32 nothing checks the gradients first, so the weights took the step.
            raise TrainingStopped(
                "a non-finite loss reached the weights: DeepSpeed's pipeline engine applies the step "
                "before it can be checked in fp32 (bf16 and fp16 skip it); resume from the last "
                "checkpoint, which holds the last good state",
                EXIT_NON_FINITE,
            )
        # The pipeline engine interleaves forward and backward; it reports the DP-mean loss.
        return StepResult({"loss": loss_tensor.detach().float()}, timing, skipped=False, flops=flops)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        """Loss of one batch without training (dropout off), in this layout."""
        device = accelerator.current_device()
        if self.pipeline:
            feed = iter([pipeline_inputs(to_device(batch, device))])
            return float(self.ds.eval_batch(data_iter=feed, num_micro_batches=1))
        was_training = self.ds.module.training
        self.ds.module.eval()
        try:
            return float(self.ds(to_device(batch, device))["loss"])
        finally:
            self.ds.module.train(was_training)

    def gathered_parameters(self, names: list[str]) -> contextlib.AbstractContextManager:
        """Context in which the named parameters of :attr:`model` hold their full local values.

        ZeRO-3 keeps each parameter partitioned over DP ranks between uses; this gathers
        them (collective: every DP rank must enter). A no-op for other stages.
        """
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        params = dict(self.model.named_parameters())
        return deepspeed.zero.GatheredParameters([params[n] for n in names], modifier_rank=None)


@contextlib.contextmanager
def _frozen_parameters_kept(module: nn.Module, zero: int) -> Iterator[None]:
    """Keep frozen parameters out of DeepSpeed's cast to the engine's bf16 / fp16.

    DeepSpeed casts every floating-point parameter, frozen ones included: an fp16 frozen
    ViT would turn bf16, and its fp32 LayerNorms and position embedding half precision
    (LAVIS halves only Linear/Conv weights and keeps the residual stream fp32). While
    DeepSpeed sets up, each frozen parameter holds an empty placeholder; afterwards it gets
    its own tensor back, untouched and without a copy. ZeRO-3 partitions every parameter,
    frozen ones included, as it sets up, so there DeepSpeed's cast stands.
    """
    if zero == 3:
        yield
        return
    kept = {p: p.data for p in module.parameters() if not p.requires_grad}
    for param in kept:
        param.data = param.data.new_empty(0)
    try:
        yield
    finally:
        for param, data in kept.items():
            param.data = data


def build_engine(
    job: JobConfig,
    ds_raw: dict[str, Any],
    total_steps: int,
    steps_per_epoch: int,
    trained: Path | None = None,
) -> Engine:
    """The model of ``job`` for this rank under DeepSpeed, with our optimizer and LR schedule.

    Megatron-core's groups must be running with ``job.tp`` / ``job.pp``. ``trained``: a
    checkpoint whose saved weights the model starts from (a resume in another layout).
    """
    import deepspeed

    _check_quantized_llm(job)
    device = accelerator.current_device()
    configured = fill_ds_config(job, ds_raw, state.dp_size())
    ds_config = without_idle_zero(configured, state.dp_size(), job.train.precision)
    if job.pp > 1:
        module: nn.Module = build_pipeline_module(job, device, trained)
        mpu = None  # the pipeline engine brings its own grid (checked equal to megatron-core's)
    else:
        module = build_model(job.model, device=device, trained=trained)
        _check_quantized_llm_comes_from_files(module, job)
        if hasattr(module, "dp_group") and state.dp_size() > 1:
            module.dp_group = state.dp_group()  # stage 1: ITC negatives gathered over data-parallel ranks
        mpu = MegatronMpu()
    optimizer = build_optimizer(module, job.train)
    scheduler = WarmupCosineSchedule(optimizer, job.train, total_steps, steps_per_epoch)
    with _frozen_parameters_kept(module, zero_stage(ds_config)):
        ds_engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            mpu=mpu,
            dist_init_required=False,
        )
    stage = zero_stage(ds_config)
    if job.pp == 1 and state.dp_size() == 1 and stage == 0:
        ds_engine.enable_backward_allreduce = False  # an all-reduce over one rank: flatten and copy back
    model = unwrap_stage(module.forward_funcs[0]) if job.pp > 1 else module
    logger.info(
        "engine: %s, ZeRO stage %d%s, TP %d x PP %d x DP %d",
        "pipeline" if job.pp > 1 else "data parallel",
        stage,
        f" (ds_config: {zero_stage(configured)}, nothing to partition at DP 1)"
        if stage != zero_stage(configured)
        else "",
        job.tp,
        job.pp,
        state.dp_size(),
    )
    return Engine(ds=ds_engine, scheduler=scheduler, model=model, job=job)
