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
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.build import build_model, inference_config, predictor_for
from blip2_megatron.config import ConfigError, JobConfig, save_job_config
from blip2_megatron.data.batch import BatchBuilder, build_batch_builder
from blip2_megatron.data.loader import build_train_loader
from blip2_megatron.eval.runner import run_evaluation
from blip2_megatron.io import CheckpointMismatchError, write_json_atomic
from blip2_megatron.parallel import state
from blip2_megatron.parallel.tp_split import loader_image_rows
from blip2_megatron.training import checkpoint, faults
from blip2_megatron.training.ds_config import check_layout, read_ds_config, without_idle_zero, zero_stage
from blip2_megatron.training.engine import Engine, build_engine
from blip2_megatron.training.faults import EXIT_NON_FINITE, TrainingStopped
from blip2_megatron.training.monitors import Monitors, ProgressBar, without_deepspeed_monitors
from blip2_megatron.training.throughput import ThroughputMeter, part_precisions

logger = logging.getLogger(__name__)


class PreemptionFlag:
    """Remembers a SIGTERM / SIGUSR1 so the loop can save and exit at a step boundary.

    Ranks agree through an all-reduce of one host integer per step over the host (gloo)
    group: a network round trip, without waiting for the device as a reduction of a device
    tensor would (and NCCL / HCCL would not take a CPU tensor).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self.group = state.host_group()
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, _frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        logger.warning("received %s: will save a checkpoint and exit after this step", self.signal_name)

    def raised_anywhere(self) -> str | None:
        """The signal's name on every rank as soon as any rank got one (ranks must stop together).

        The signal number itself is reduced, so a rank the signal has not reached yet still
        records which signal stopped the job (SIGTERM over SIGUSR1 where both arrived).
        """
        number = signal.Signals[self.signal_name].value if self.signal_name else 0
        flag = torch.tensor([number], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return signal.Signals(int(flag.item())).name if flag.item() else None


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


def _eval_dtype(job: JobConfig) -> torch.dtype | None:
    """The autocast dtype evaluation computes in (``eval.precision``, "auto": the training precision off CPU)."""
    return accelerator.inference_dtype(job.eval.precision, job.train.precision)


def _reduce_over_dp(
    means: dict[str, torch.Tensor], sums: dict[str, float]
) -> tuple[dict[str, float], dict[str, float]]:
    """``means`` averaged and ``sums`` added over data-parallel ranks, in one all-reduce.

    ``means`` are device scalars (the window's losses), ``sums`` host numbers (FLOPs). This
    is where the losses are read on the host: at log steps only. float32 throughout: HCCL
    on Ascend 910B has no float64 reductions (FLOPs keep float32's 7 significant digits).
    """
    device = accelerator.current_device()
    names, sum_names = sorted(means), sorted(sums)
    values = [means[n].to(device=device, dtype=torch.float32).reshape(1) for n in names]
    values.append(torch.tensor([sums[n] for n in sum_names], dtype=torch.float32, device=device))
    tensor = torch.cat(values)
    dist.all_reduce(tensor, group=state.dp_group())
    reduced = tensor.tolist()
    mean_values = {n: v / state.dp_size() for n, v in zip(names, reduced)}
    return mean_values, dict(zip(sum_names, reduced[len(names) :]))


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
    if not engine.pipeline and engine.zero_stage != 3:
        return run_evaluation(
            predictor_for(engine.model, job.model, builder, _eval_dtype(job)), job, output_dir
        )
    # Pipeline stages cannot generate and ZeRO-3 holds a 1/DP slice of each weight: evaluate
    # a whole model read from the checkpoint just written, split over TP only.
    eval_job = dataclasses.replace(job, model=inference_config(job.model, dist.get_world_size()))
    tp = eval_job.tp
    logger.info("evaluating with TP %d (training ran TP %d x PP %d)", tp, job.tp, job.pp)
    state.initialize_model_parallel(tp, 1)
    accelerator.manual_seed(job.train.seed)
    model = build_model(eval_job.model, device=accelerator.current_device(), trained=checkpoint_dir)
    return run_evaluation(
        predictor_for(model, eval_job.model, compute_dtype=_eval_dtype(job)), eval_job, output_dir
    )


def run_training(job: JobConfig, ds_config_path: str | Path) -> dict[str, Any]:
    """Train ``job`` with the DeepSpeed config at ``ds_config_path``; return the run summary.

    Raises :class:`~blip2_megatron.training.faults.TrainingStopped` when the job stops on
    purpose (every rank together: a full disk, too many non-finite steps). Any other
    failure in a multi-rank job (a lost peer above all) ends this rank at once with a
    message naming what is known, so that no rank waits for a peer that is gone.
    """
    state.init_distributed(job.train.collective_timeout_s)
    faults.register_peer()
    phase = "setting up"
    try:
        run = _TrainingRun(job, ds_config_path)
        phase = "training"
        run.train()
        phase = "finishing"
        return run.finish()
    except (TrainingStopped, ConfigError, CheckpointMismatchError, FileNotFoundError):
        raise  # every rank meets these together (configs, checkpoints): a normal exit
    except Exception as err:
        if dist.get_world_size() == 1:
            raise
        faults.abort_rank(err, phase)


class _TrainingRun:
    """One training job on this rank: set-up (loader, engine, resume), the loop, the summary."""

    def __init__(self, job: JobConfig, ds_config_path: str | Path):
        self.job = job
        ds_raw = read_ds_config(ds_config_path)
        check_layout(job, ds_raw, dist.get_world_size())
        self.monitors = Monitors(job, ds_raw, Path(job.train.output_dir), enabled=dist.get_rank() == 0)
        ds_raw = without_deepspeed_monitors(ds_raw)
        state.initialize_model_parallel(job.tp, job.pp)
        self.dp_rank, self.dp_size = state.dp_rank(), state.dp_size()
        self.rank0 = dist.get_rank() == 0
        self.output_dir = _prepare_output(job)
        self.preemption = PreemptionFlag()

        self.builder = build_batch_builder(job.model)
        self.loader = build_train_loader(
            job.data,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            seed=job.train.seed,
            batch_builder=self.builder,
            image_rows=loader_image_rows(job.model, job.data.batch_size),
        )
        steps_per_epoch = max(self.loader.batches_per_epoch // job.train.grad_accum, 1)
        self.total_steps = job.train.max_steps or job.train.epochs * steps_per_epoch

        checkpoint.clean_partial_checkpoints(job)
        # The stage DeepSpeed will run decides which engine files fit (they differ by stage).
        resume = checkpoint.resolve_resume(
            job, zero_stage(without_idle_zero(ds_raw, self.dp_size, job.train.precision))
        )
        # Same seed everywhere for initialisation (replicated modules must start equal), then
        # one stream per data-parallel rank: TP/PP ranks of one DP rank draw the same dropout.
        accelerator.manual_seed(job.train.seed)
        trained = resume.path if resume is not None and not resume.engine_files_fit else None
        self.engine = build_engine(job, ds_raw, self.total_steps, steps_per_epoch, trained=trained)
        accelerator.manual_seed(job.train.seed + self.dp_rank)

        self.start_step = self.step = 0
        self.last_saved: int | None = None
        self.last_checkpoint: Path | None = None
        self.best: dict[str, Any] | None = None  # {"metric", "step"} of the best validation so far
        if resume is not None:
            trainer_state = checkpoint.restore(self.engine, resume)
            self.start_step = self.step = self.last_saved = resume.step
            self.last_checkpoint = resume.path
            self.loader.load_state_dict(trainer_state["loader"])
            self.best = checkpoint.read_best(resume.path.parent)
        self.validated_epoch = self.loader.epoch

        self.global_batch = job.data.batch_size * job.train.grad_accum * self.dp_size
        self.meter = ThroughputMeter(
            global_batch=self.global_batch,
            world_size=dist.get_world_size(),
            precisions=part_precisions(job.model, job.train.precision),
            warmup_steps=job.train.warmup_log_steps,
        )
        self.bad_steps = faults.NonFiniteSteps(job.train.max_bad_steps)
        self.log = RunLog(self.output_dir, enabled=self.rank0)
        self.stopped_by: str | None = None
        if self.rank0:
            logger.info(
                "training %s: %d steps (%d per epoch), global batch %d = %d x %d accum x DP %d; TP %d PP %d; "
                "output %s",
                job.name,
                self.total_steps,
                steps_per_epoch,
                self.global_batch,
                job.data.batch_size,
                job.train.grad_accum,
                self.dp_size,
                job.tp,
                job.pp,
                self.output_dir,
            )

    def save(self) -> None:
        state_now = {"loader": self.loader.state_dict(), "epoch": self.loader.epoch}
        self.last_checkpoint = checkpoint.save_checkpoint(self.engine, self.job, self.step, state_now)
        self.last_saved = self.step

    def validation_due(self) -> bool:
        interval, job = self.job.eval.interval, self.job
        if not interval or self.step >= self.total_steps:
            return False  # the end of training has its own evaluation (eval.enabled)
        if job.eval.interval_unit == "steps":
            return self.step % interval == 0
        if self.loader.epoch != self.validated_epoch and self.loader.epoch % interval == 0:
            self.validated_epoch = self.loader.epoch
            return True
        return False

    def validate(self, final: bool = False) -> dict[str, Any]:
        """The job's evaluation now, on every DP rank; keeps the best checkpoint (``best``)."""
        job = self.job
        if final:
            metrics = _evaluate(self.engine, job, self.builder, self.last_checkpoint, self.output_dir)
        else:
            folder = self.output_dir / "validation" / checkpoint.tag_for_step(self.step)
            predictor = predictor_for(self.engine.model, job.model, self.builder, _eval_dtype(job))
            metrics = run_evaluation(predictor, job, folder)
        shared = [metrics.get("agg_metric")]
        dist.broadcast_object_list(shared, src=0)  # scored on rank 0; every rank decides alike
        value = shared[0]
        self.log.write({"event": "eval", "step": self.step, **metrics})
        self.monitors.write(self.step, metrics, prefix="eval")
        if job.eval.keep_best and job.eval.interval and value is not None:
            if self.best is None or value > self.best["metric"]:
                if self.last_saved != self.step:
                    self.save()
                self.best = {"tag": self.last_checkpoint.name, "step": self.step, "metric": value}
                checkpoint.mark_best(self.last_checkpoint, self.step, value)
        return metrics

    def train(self) -> None:
        job, total = self.job, self.total_steps
        batches = self.loader.endless()
        window: list[dict[str, torch.Tensor]] = []  # losses of the good steps since the last log
        progress = ProgressBar(total, self.step, enabled=self.rank0)
        while self.step < total:
            result = self.engine.step(batches)
            self.step += 1
            self.meter.record(result.timing, result.flops)
            if self.bad_steps.record(self.step, result.skipped):
                self.save()  # the skipped steps changed nothing: this is the last good state
                raise TrainingStopped(
                    f"{self.bad_steps.in_a_row} non-finite steps in a row (train.max_bad_steps={job.train.max_bad_steps}); "
                    f"the last good state is saved as {self.last_checkpoint}. Lower train.lr, check the data, or use "
                    "bf16 / fp16 loss scaling",
                    EXIT_NON_FINITE,
                )
            if not result.skipped:
                window.append(result.losses)
            log_step = window and (
                self.step % job.train.log_interval == 0
                or self.step == total
                or self.step == self.start_step + 1
            )
            if not log_step:
                progress.update()
            else:
                window_means = {k: torch.stack([w[k] for w in window]).mean() for k in window[0]}
                mean_losses, flops = _reduce_over_dp(window_means, self.meter.window.flops)
                window.clear()
                record = {
                    "step": self.step,
                    "epoch": self.loader.epoch,
                    **mean_losses,
                    "lr": self.engine.scheduler.get_last_lr()[0],
                    "skipped_steps": self.bad_steps.total,
                    **self.meter.interval(flops),
                }
                progress.update(mean_losses)
                self.log.step(record, total)
                self.monitors.write(self.step, record)
            stopped_by = self.preemption.raised_anywhere()
            if stopped_by:
                self.stopped_by = stopped_by
                break
            if job.train.save_interval and self.step % job.train.save_interval == 0 and self.step < total:
                with self.meter.paused():
                    self.save()
            if self.validation_due():
                with self.meter.paused():
                    self.validate()
        progress.close()
        if self.last_saved != self.step:
            self.save()

    def _measured_flops(self) -> dict[str, float] | None:
        """The FLOPs of the steps after warm-up, summed over data-parallel ranks (all ranks call)."""
        measured = self.meter.measured
        if measured is None or not measured.flops:
            return None
        return _reduce_over_dp({}, measured.flops)[1]

    def finish(self) -> dict[str, Any]:
        job = self.job
        summary: dict[str, Any] = {
            "event": "summary",
            "job": job.name,
            "steps": self.step,
            "epochs": job.train.epochs,
            "epoch_reached": self.loader.epoch,
            "global_batch": self.global_batch,
            "per_device_batch": job.data.batch_size,
            "world_size": dist.get_world_size(),
            "tp": job.tp,
            "pp": job.pp,
            "dp": self.dp_size,
            "device": accelerator.device_name_for_peak(),
            "precision": job.train.precision,
            "stopped_by_signal": self.stopped_by,
            "skipped_steps": self.bad_steps.total,
            "data_skipped": dict(getattr(self.loader, "stats", {}) or {}),
            "data_sources": self.loader.num_sources,
            "trainable_params": _count_over_model_parallel(self.engine),
            **self.meter.summary(self._measured_flops()),
        }
        if job.eval.enabled and self.stopped_by is None:
            summary.update(self.validate(final=True))
        if self.best is not None:
            summary["best"] = self.best
        self.monitors.close()
        if self.rank0:
            self.log.write(summary)
            write_json_atomic(summary, self.output_dir / "summary.json")
            fps = summary["fps_mean"]
            logger.info(
                "done: %d steps in %.1fs, mean fps %s after %d warm-up steps; log %s, checkpoints %s",
                self.step,
                summary["total_time_s"],
                "n/a" if fps is None else f"{fps:.2f}",
                job.train.warmup_log_steps,
                self.output_dir / "log.jsonl",
                self.output_dir / "checkpoints",
            )
        dist.barrier()
        return summary
