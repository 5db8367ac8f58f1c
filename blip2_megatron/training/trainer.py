"""The training job: process groups -> model -> DeepSpeed engine -> loop -> checkpoints/logs.

:func:`run_training` is what ``launch/train.py`` calls. Parallelism is applied here, in
one order: megatron-core groups (TP/PP/DP), the model built for this rank's TP shard and
pipeline stage, then DeepSpeed (ZeRO data parallelism, or the pipeline engine when PP > 1).
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.data.loader import build_train_loader
from blip2_megatron.eval.report import write_json_atomic
from blip2_megatron.models.factory import build_model
from blip2_megatron.parallel import state
from blip2_megatron.parallel.mpu import MegatronMpu
from blip2_megatron.training import checkpoint
from blip2_megatron.training.config import JobConfig, save_job_config
from blip2_megatron.training.ds_config import check_layout, fill_ds_config, read_ds_config
from blip2_megatron.training.optim import WarmupCosineSchedule, build_optimizer
from blip2_megatron.training.throughput import StepTiming, ThroughputMeter, train_flops_per_image

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


class DataParallelStep:
    """One optimizer step with the plain DeepSpeed engine (PP = 1): micro-batches x accum."""

    def __init__(self, engine: Any, grad_accum: int):
        self.engine = engine
        self.grad_accum = grad_accum
        self.device = accelerator.current_device()

    def __call__(self, batches: Iterator[dict[str, Any]]) -> tuple[dict[str, float], StepTiming]:
        timing = StepTiming()
        sums: dict[str, float] = {}
        for _ in range(self.grad_accum):
            start = time.perf_counter()
            samples = next(batches)
            batch = self.engine.module.prepare_batch(samples, device=self.device)
            timing.data += time.perf_counter() - start

            start = time.perf_counter()
            losses = self.engine(batch)
            accelerator.synchronize()
            timing.forward += time.perf_counter() - start

            start = time.perf_counter()
            self.engine.backward(losses["loss"])
            accelerator.synchronize()
            timing.backward += time.perf_counter() - start

            start = time.perf_counter()
            self.engine.step()
            accelerator.synchronize()
            timing.optimizer += time.perf_counter() - start
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        return {k: v / self.grad_accum for k, v in sums.items()}, timing


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


def _prepare_output(job: JobConfig) -> Path:
    out = Path(job.train.output_dir)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_job_config(job, out / "config.yaml")
    return out


def build_engine(
    job: JobConfig, model: torch.nn.Module, ds_raw: dict[str, Any], total_steps: int, steps_per_epoch: int
):
    """DeepSpeed engine over ``model`` with our optimizer and schedule (PP = 1)."""
    import deepspeed

    ds_config = fill_ds_config(job, ds_raw, state.dp_size())
    optimizer = build_optimizer(model, job.train)
    scheduler = WarmupCosineSchedule(optimizer, job.train, total_steps, steps_per_epoch)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
        mpu=MegatronMpu(),
        dist_init_required=False,
    )
    return engine, scheduler


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

    loader = build_train_loader(job.data, dp_rank=dp_rank, dp_size=dp_size, seed=job.train.seed)
    steps_per_epoch = max(loader.batches_per_epoch // job.train.grad_accum, 1)
    total_steps = job.train.max_steps or job.train.epochs * steps_per_epoch

    # Same seed everywhere for initialisation (replicated modules must start equal), then
    # one stream per data-parallel rank: TP/PP ranks of one DP rank draw the same dropout.
    accelerator.manual_seed(job.train.seed)
    if job.pp > 1:
        from blip2_megatron.parallel.pipeline import build_pipeline_engine

        engine, scheduler, run_step = build_pipeline_engine(job, ds_raw, total_steps, steps_per_epoch)
    else:
        model = build_model(job.model, device=accelerator.current_device())
        if hasattr(model, "dp_group") and dp_size > 1:
            model.dp_group = state.dp_group()  # stage 1: ITC negatives gathered over data-parallel ranks
        engine, scheduler = build_engine(job, model, ds_raw, total_steps, steps_per_epoch)
        run_step = DataParallelStep(engine, job.train.grad_accum)
    accelerator.manual_seed(job.train.seed + dp_rank)

    start_step = 0
    resume = checkpoint.resolve_resume(job)
    if resume is not None:
        trainer_state = checkpoint.load_checkpoint(engine, job, *resume)
        start_step = int(trainer_state["step"])
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
    window: list[dict[str, float]] = []
    stopped_by = None
    while step < total_steps:
        losses, timing = run_step(batches)
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
                "lr": scheduler.get_last_lr()[0],
                **figures,
            }
            if not all(math.isfinite(v) for v in mean_losses.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {mean_losses}")
            log.step(record, total_steps)
        if preemption.raised_anywhere():
            stopped_by = preemption.signal_name or "signal on another rank"
            break
        if job.train.save_interval and step % job.train.save_interval == 0 and step < total_steps:
            checkpoint.save_checkpoint(
                engine, job, step, {"loader": loader.state_dict(), "epoch": loader.epoch}
            )
            last_saved = step

    if last_saved != step:
        checkpoint.save_checkpoint(engine, job, step, {"loader": loader.state_dict(), "epoch": loader.epoch})

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
        **meter.summary(),
    }
    if job.eval.enabled and stopped_by is None:
        if job.pp > 1:
            logger.warning(
                "eval.enabled is ignored with model.llm.pp=%d: generation needs the whole model on one rank, "
                "and resharding a pipeline checkpoint to pp=1 is not supported yet",
                job.pp,
            )
        else:
            from blip2_megatron.eval.runner import run_evaluation

            summary.update(run_evaluation(engine.module, job, output_dir))
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
