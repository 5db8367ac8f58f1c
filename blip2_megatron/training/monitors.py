"""Experiment tracking: every logged number to TensorBoard, Weights & Biases and CSV, and a progress bar.

Switched on from the job (``train.monitors: [tensorboard, wandb, csv]``) or from the
DeepSpeed config's monitor sections (``tensorboard``, ``wandb``, ``csv_monitor`` with
``enabled: true``), which are taken over here rather than handed to DeepSpeed: DeepSpeed's
own monitors only see its learning rate and loss scale, while these get every loss, the
learning rate, FPS, TFLOP/s, memory and each evaluation metric, at the training step they
belong to. Global rank 0 writes; the packages are optional (``pip install -e ".[tracking]"``)
and a missing one is an error naming that command. W&B runs offline unless ``WANDB_MODE``
says otherwise (``wandb sync <run dir>/wandb/offline-run-*`` uploads later).
"""

from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path
from typing import Any

from blip2_megatron.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

MONITORS = ("tensorboard", "wandb", "csv")
_DEEPSPEED_SECTIONS = {"tensorboard": "tensorboard", "wandb": "wandb", "csv_monitor": "csv"}
_INSTALL = 'pip install -e ".[tracking]"'


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a log record (ids, names and None left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, int | float)
        and not isinstance(v, bool)
        and k not in ("step", "epoch")
        and math.isfinite(v)
    }


class _TensorBoard:
    def __init__(self, folder: Path, job: JobConfig):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(f"the tensorboard monitor needs the tensorboard package: {_INSTALL}") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, folder: Path, job: JobConfig, settings: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"the wandb monitor needs the wandb package: {_INSTALL}") from None
        import os

        from blip2_megatron.config import job_config_to_dict

        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=settings.get("project") or "blip2-megatron",
            group=settings.get("group"),
            name=settings.get("name") or job.name,
            dir=str(folder),
            config=job_config_to_dict(job),
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="finish_previous",
        )

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        self.run.log({f"{prefix}/{name}": value for name, value in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class _CSV:
    """One ``<prefix>_<name>.csv`` per metric with ``step,value`` rows (DeepSpeed's CSV layout)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, values: dict[str, float], prefix: str) -> None:
        for name, value in values.items():
            path = self.folder / f"{prefix}_{name.replace('/', '_')}.csv"
            new = not path.exists()
            with path.open("a", newline="") as handle:
                writer = csv.writer(handle)
                if new:
                    writer.writerow(["step", "value"])
                writer.writerow([step, value])

    def close(self) -> None:
        pass


def requested_monitors(job: JobConfig, ds_config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Monitor name -> its settings, from the job and the DeepSpeed config's monitor sections."""
    chosen: dict[str, dict[str, Any]] = {name: {} for name in job.train.monitors}
    for section, name in _DEEPSPEED_SECTIONS.items():
        settings = ds_config.get(section) or {}
        if settings.get("enabled") in (True, "true"):
            chosen[name] = {
                "output_path": settings.get("output_path"),
                "project": settings.get("project"),
                "group": settings.get("group"),
                "name": settings.get("job_name") or settings.get("name"),
            }
    return chosen


def without_deepspeed_monitors(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config with its monitor sections off (this module writes those numbers)."""
    return {k: ({**v, "enabled": False} if k in _DEEPSPEED_SECTIONS else v) for k, v in ds_config.items()}


class Monitors:
    """The chosen monitors of a run; every method is a no-op on ranks other than global rank 0."""

    def __init__(self, job: JobConfig, ds_config: dict[str, Any], output_dir: Path, enabled: bool):
        self.sinks: list[Any] = []
        if not enabled:
            return
        for name, settings in requested_monitors(job, ds_config).items():
            folder = Path(settings.get("output_path") or output_dir) / name
            if name == "tensorboard":
                self.sinks.append(_TensorBoard(folder, job))
            elif name == "wandb":
                self.sinks.append(_WandB(folder, job, settings))
            else:
                self.sinks.append(_CSV(folder))
            logger.info("tracking to %s (%s)", name, folder)

    def write(self, step: int, record: dict[str, Any], prefix: str = "train") -> None:
        values = _numbers(record)
        for sink in self.sinks:
            sink.write(step, values, prefix)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class ProgressBar:
    """A rank-0 progress bar with ETA over the training steps; off when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=total,
            initial=start,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            leave=False,
            disable=not (enabled and sys.stderr.isatty()),
        )

    def update(self, losses: dict[str, float] | None = None) -> None:
        """One step done; ``losses`` (at log steps) shows the latest loss."""
        if losses and "loss" in losses:
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
