"""Pipeline parallelism: BLIP-2 stages under DeepSpeed's PipelineModule / PipelineEngine.

Each pipeline stage is one :class:`Blip2PipeStage`: the same ``Blip2ForLLM`` class with
parts absent. Stage 0 holds the ViT, Q-Former, projection and token embeddings plus its
share of decoder layers; the last stage holds its layers, the final norm, the head and the
loss; stages between hold layers only. Stages exchange ``(hidden_states, attention_mask)``.
Labels reach the last stage through the engine's data iterator, which yields
``((image, input_ids, attention_mask, image_slots), labels)`` on every stage.

DeepSpeed builds its own process grid from ``PipeModelDataParallelTopology``; it must
equal megatron-core's groups (which the tensor-parallel layers use), and
:func:`check_grid_matches_megatron` asserts that it does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import nn

from blip2_megatron import accelerator
from blip2_megatron.config import Blip2Config
from blip2_megatron.parallel import state
from blip2_megatron.training.throughput import StepTiming

logger = logging.getLogger(__name__)


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[tuple[int, int]]:
    """Decoder layers per stage, as even as possible (earlier stages take the remainder)."""
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


class Blip2PipeStage(nn.Module):
    """One pipeline stage of a BLIP-2 LLM model."""

    def __init__(self, cfg: Blip2Config, stage_id: int, num_stages: int, device: torch.device):
        super().__init__()
        from blip2_megatron.models.factory import build_model

        self.stage_id = stage_id
        self.first = stage_id == 0
        self.last = stage_id == num_stages - 1
        layer_range = stage_layer_ranges(cfg.llm.num_layers, num_stages)[stage_id]
        self.model = build_model(
            cfg, device=device, pre_process=self.first, post_process=self.last, layer_range=layer_range
        )
        # Every stage must hand DeepSpeed the same optimizer groups (weight decay / none):
        # ZeRO runs one grad-norm collective per group over all stages, and an empty
        # parameter list is refused outright. A stage whose trainable parameters lack a
        # kind (all frozen layers: both) gets a one-element placeholder of that kind; it is
        # added to the output times zero, so it has a (zero) gradient and changes nothing.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.placeholders = nn.ParameterList()
        if not any(p.ndim >= 2 for p in trainable):
            self.placeholders.append(nn.Parameter(torch.zeros(1, 1, device=device)))
        if not any(p.ndim < 2 for p in trainable):
            self.placeholders.append(nn.Parameter(torch.zeros(1, device=device)))

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> Any:
        lm = self.model.language_model
        if self.first:
            image, input_ids, attention_mask, image_slots = inputs
            embeds = self.model.input_embeddings(image, input_ids, image_slots.bool())
            out = lm(inputs_embeds=embeds, attention_mask=attention_mask)
        else:
            hidden_states, attention_mask = inputs
            out = lm(hidden_states=hidden_states, attention_mask=attention_mask)
        output = out.logits if self.last else out.hidden_states
        for placeholder in self.placeholders:
            output = output + 0.0 * placeholder.sum().to(output.dtype)
        return output if self.last else (output, attention_mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model.language_model.causal_lm_loss(logits, labels)


def check_grid_matches_megatron(topology: Any) -> None:
    """Assert DeepSpeed's pipe/data/model groups contain this rank with megatron-core's members."""
    rank = dist.get_rank()
    pairs = {
        "model": parallel_state.get_tensor_model_parallel_group(),
        "data": parallel_state.get_data_parallel_group(),
        "pipe": parallel_state.get_pipeline_model_parallel_group(),
    }
    for axis, group in pairs.items():
        megatron_ranks = sorted(dist.get_process_group_ranks(group))
        deepspeed_ranks = next(sorted(r) for r in topology.get_axis_comm_lists(axis) if rank in r)
        if megatron_ranks != deepspeed_ranks:
            raise RuntimeError(
                f"DeepSpeed's {axis} group {deepspeed_ranks} differs from megatron-core's {megatron_ranks} on rank {rank}"
            )


def build_pipeline_module(job: Any) -> Any:
    """DeepSpeed PipelineModule over our stages (only this rank's stage is built)."""
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    if job.model.llm is None:
        raise ValueError("pipeline parallelism splits the LLM; stage-1 models have none (set model.llm.pp=1)")
    pp, tp = job.pp, job.tp
    topology = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=state.dp_size())
    check_grid_matches_megatron(topology)
    device = accelerator.current_device()
    specs = [LayerSpec(Blip2PipeStage, job.model, stage, pp, device) for stage in range(pp)]
    module = PipelineModule(layers=specs, topology=topology, partition_method="uniform", loss_fn=None)
    local_stage = module.forward_funcs[0]
    module.loss_fn = local_stage.loss
    return module


class PipelineBatches:
    """Turns loader batches into the (inputs, labels) pairs the pipeline engine reads."""

    def __init__(self, batches: Iterator[dict[str, Any]], prepare: Any):
        self.batches = batches
        self.prepare = prepare
        self.data_time = 0.0

    def __iter__(self) -> PipelineBatches:
        return self

    def __next__(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        start = time.perf_counter()
        batch = self.prepare(next(self.batches))
        self.data_time += time.perf_counter() - start
        inputs = (batch["image"], batch["input_ids"], batch["attention_mask"], batch["image_slots"].long())
        return inputs, batch["labels"]


class PipelineStep:
    """One optimizer step through the pipeline engine (all micro-batches of the step)."""

    def __init__(self, engine: Any, prepare: Any):
        self.engine = engine
        self.prepare = prepare
        self._iter: PipelineBatches | None = None

    def __call__(self, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float], StepTiming]:
        if self._iter is None:
            self._iter = PipelineBatches(batches, self.prepare)
        self._iter.data_time = 0.0
        start = time.perf_counter()
        loss = self.engine.train_batch(data_iter=self._iter)
        accelerator.synchronize()
        total = time.perf_counter() - start
        timing = StepTiming(data=self._iter.data_time, forward=total - self._iter.data_time)
        return {"loss": float(loss)}, timing


def build_pipeline_engine(job: Any, ds_raw: dict[str, Any], total_steps: int, steps_per_epoch: int):
    """(engine, scheduler, step runner) for PP > 1."""
    import deepspeed

    from blip2_megatron.models.blip2 import prepare_llm_batch
    from blip2_megatron.models.factory import build_tokenizers
    from blip2_megatron.training.ds_config import fill_ds_config
    from blip2_megatron.training.optim import WarmupCosineSchedule, build_optimizer

    module = build_pipeline_module(job)
    ds_config = fill_ds_config(job, ds_raw, state.dp_size())
    optimizer = build_optimizer(module, job.train)
    scheduler = WarmupCosineSchedule(optimizer, job.train, total_steps, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    _, tokenizer = build_tokenizers(job.model)
    device = accelerator.current_device()

    def prepare(samples: dict[str, Any]) -> dict[str, Any]:
        return prepare_llm_batch(tokenizer, job.model, samples, device)

    return engine, scheduler, PipelineStep(engine, prepare)
