"""The training job: process groups -> loader -> engine -> loop -> checkpoints, logs, evaluation.

:func:`run_training` is what ``launch/train.py`` calls: megatron-core groups (TP/PP/DP),
the loader of this rank's DP shard with the batch builder in its workers, the engine
(``training/engine.py``: the model under DeepSpeed, any layout), the loop, and the
evaluation the job asks for at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.build import build_model, inference_config, predictor_for
from blip2_megatron.config import JobConfig, save_job_config
from blip2_megatron.data.batch import BatchBuilder, build_batch_builder
from blip2_megatron.data.loader import build_train_loader
from blip2_megatron.io import write_json_atomic
from blip2_megatron.parallel import state
from blip2_megatron.training import checkpoint
from blip2_megatron.training.ds_config import check_layout, read_ds_config, zero_stage
from blip2_megatron.training.engine import Engine, build_engine
from blip2_megatron.training.throughput import ThroughputMeter, train_flops_per_image

logger = logging.getLogger(__name__)


class PreemptionFlag:
    """Remembers a SIGTERM / SIGUSR1 so the loop can save and exit at a step boundary."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: will save a checkpoint and exit after this step", self.signal_name)

    def raised_anywhere(self) -> bool:
        """True on every rank as soon as any rank got the signal (ranks must stop together)."""
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.current_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class RunLog:
    """The JSONL record and the human line of each log step (written by global rank 0)."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = output_dir / "log.jsonl"
        if enabled:
            output_dir.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def step(self, record: dict[str, Any], total_steps: int) -> None:
        if not self.enabled:
            return
        self.write(record)
        losses = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss"))
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
        logger.info(
            "step %d/%d epoch %d | %s | lr=%.3e | fps=%.2f (%.2f/device) | step %.3fs data %.3fs | "
            "%.3f TFLOP/s/device | mfu %s | peak mem %.2f GB",
            record["step"],
            total_steps,
            record["epoch"],
            losses,
            record["lr"],
            record["fps"],
            record["fps_per_device"],
            record["step_time"],
            record["data_time"],
            record["tflops_per_device"],
            mfu,
            record["peak_mem_gb"],
        )


def _mean_over_dp(values: dict[str, float]) -> dict[str, float]:
    if not values:
        return values
    names = sorted(values)
    tensor = torch.tensor(
        [values[n] for n in names], dtype=torch.float64, device=accelerator.current_device()
    )
    dist.all_reduce(tensor, group=state.dp_group())
    tensor /= state.dp_size()
    return dict(zip(names, tensor.tolist()))


def _count_over_model_parallel(engine: Engine) -> int:
    """Trainable parameters of the whole model: this rank's, summed over its TP and PP peers.

    Parameters replicated over TP (the ViT, the Q-Former, norms) count once.
    """
    from blip2_megatron.convert.run_checkpoint import partition_dim

    count = 0
    for param in engine.model.parameters():
        if param.requires_grad:
            replicated = partition_dim(param) is None
            count += param.ds_numel if hasattr(param, "ds_numel") else param.numel()
            if replicated and state.tp_rank() != 0:
                count -= param.ds_numel if hasattr(param, "ds_numel") else param.numel()
    total = torch.tensor([count], dtype=torch.int64, device=accelerator.current_device())
    for group in (state.tp_group(), state.pp_group()):
        dist.all_reduce(total, group=group)
    return int(total.item())


def _prepare_output(job: JobConfig) -> Path:
    out = Path(job.train.output_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_job_config(job, out / "config.yaml")
    return out


def _evaluate(engine: Engine, job: JobConfig, builder: BatchBuilder, checkpoint_dir: Path, output_dir: Path):
    """The job's evaluation at the end of training, on every rank."""
    from blip2_megatron.eval.runner import run_evaluation

    if not engine.pipeline and engine.zero_stage != 3:
        return run_evaluation(predictor_for(engine.model, job.model, builder), job, output_dir)
    # Pipeline stages cannot generate and ZeRO-3 holds a 1/DP slice of each weight: evaluate
    # a whole model read from the checkpoint just written, split over TP only.
    eval_job = dataclasses.replace(job, model=inference_config(job.model, dist.get_world_size()))
    tp = eval_job.tp
    logger.info("evaluating with TP %d (training ran TP %d x PP %d)", tp, job.tp, job.pp)
    state.initialize_model_parallel(tp, 1)
    accelerator.manual_seed(job.train.seed)
    model = build_model(eval_job.model, device=accelerator.current_device(), trained=checkpoint_dir)
    return run_evaluation(predictor_for(model, eval_job.model), eval_job, output_dir)


def run_training(job: JobConfig, ds_config_path: str | Path) -> dict[str, Any]:
    """Train ``job`` with the DeepSpeed config at ``ds_config_path``; return the run summary."""
    state.init_distributed(job.train.collective_timeout_s)
    ds_raw = read_ds_config(ds_config_path)
    check_layout(job, ds_raw, dist.get_world_size())
    state.initialize_model_parallel(job.tp, job.pp)
    dp_rank, dp_size = state.dp_rank(), state.dp_size()
    rank0 = dist.get_rank() == 0
    output_dir = _prepare_output(job)
    preemption = PreemptionFlag()

    builder = build_batch_builder(job.model)
    loader = build_train_loader(
        job.data, dp_rank=dp_rank, dp_size=dp_size, seed=job.train.seed, batch_builder=builder
    )
    steps_per_epoch = max(loader.batches_per_epoch // job.train.grad_accum, 1)
    total_steps = job.train.max_steps or job.train.epochs * steps_per_epoch

    resume = checkpoint.resolve_resume(job, zero_stage(ds_raw))
    # Same seed everywhere for initialisation (replicated modules must start equal), then
    # one stream per data-parallel rank: TP/PP ranks of one DP rank draw the same dropout.
    accelerator.manual_seed(job.train.seed)
    trained = resume.path if resume is not None and not resume.engine_files_fit else None
    engine = build_engine(job, ds_raw, total_steps, steps_per_epoch, trained=trained)
    accelerator.manual_seed(job.train.seed + dp_rank)

    start_step = 0
    if resume is not None:
        trainer_state = checkpoint.restore(engine, resume)
        start_step = resume.step
        loader.load_state_dict(trainer_state["loader"])

    global_batch = job.data.batch_size * job.train.grad_accum * dp_size
    meter = ThroughputMeter(
        global_batch=global_batch,
        world_size=dist.get_world_size(),
        flops_per_image=train_flops_per_image(job.model),
        precision=job.train.precision,
        warmup_steps=job.train.warmup_log_steps,
    )
    log = RunLog(output_dir, enabled=rank0)
    if rank0:
        logger.info(
            "training %s: %d steps (%d per epoch), global batch %d = %d x %d accum x DP %d; TP %d PP %d; output %s",
            job.name,
            total_steps,
            steps_per_epoch,
            global_batch,
            job.data.batch_size,
            job.train.grad_accum,
            dp_size,
            job.tp,
            job.pp,
            output_dir,
        )
    batches = loader.endless()
    step = start_step
    last_saved = start_step if resume else None
    last_checkpoint = resume.path if resume else None
    window: list[dict[str, float]] = []
    stopped_by = None
    while step < total_steps:
        losses, timing = engine.step(batches)
        step += 1
        figures = meter.record(timing)
        window.append(losses)
        if step % job.train.log_interval == 0 or step == total_steps or step == start_step + 1:
            mean_losses = _mean_over_dp({k: sum(w[k] for w in window) / len(window) for k in window[0]})
            window.clear()
            record = {
                "step": step,
                "epoch": loader.epoch,
                **mean_losses,
                "lr": engine.scheduler.get_last_lr()[0],
                **figures,
            }
            if not all(math.isfinite(v) for v in mean_losses.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {mean_losses}")
            log.step(record, total_steps)
        if preemption.raised_anywhere():
            stopped_by = preemption.signal_name or "signal on another rank"
            break
        if job.train.save_interval and step % job.train.save_interval == 0 and step < total_steps:
            last_checkpoint = checkpoint.save_checkpoint(
                engine, job, step, {"loader": loader.state_dict(), "epoch": loader.epoch}
            )
            last_saved = step

    if last_saved != step:
        last_checkpoint = checkpoint.save_checkpoint(
            engine, job, step, {"loader": loader.state_dict(), "epoch": loader.epoch}
        )

    summary: dict[str, Any] = {
        "event": "summary",
        "job": job.name,
        "steps": step,
        "epochs": job.train.epochs,
        "epoch_reached": loader.epoch,
        "global_batch": global_batch,
        "per_device_batch": job.data.batch_size,
        "world_size": dist.get_world_size(),
        "tp": job.tp,
        "pp": job.pp,
        "dp": dp_size,
        "device": accelerator.device_name_for_peak(),
        "precision": job.train.precision,
        "stopped_by_signal": stopped_by,
        "data_skipped": dict(getattr(loader, "stats", {}) or {}),
        "data_sources": loader.num_sources,
        "trainable_params": _count_over_model_parallel(engine),
        **meter.summary(),
    }
    if job.eval.enabled and stopped_by is None:
        summary.update(_evaluate(engine, job, builder, last_checkpoint, output_dir))
    if rank0:
        log.write(summary)
        write_json_atomic(summary, output_dir / "summary.json")
        fps = summary["fps_mean"]
        logger.info(
            "done: %d steps in %.1fs, mean fps %s after %d warm-up steps; log %s, checkpoints %s",
            step,
            summary["total_time_s"],
            "n/a" if fps is None else f"{fps:.2f}",
            job.train.warmup_log_steps,
            output_dir / "log.jsonl",
            output_dir / "checkpoints",
        )
    dist.barrier()
    return summary
