"""Throughput benchmark: N training steps after warm-up, with a step-time breakdown.

Runs the job's model through the same engine as training (``training/engine.py``, any
TP x PP layout) on batches from the same batch builder: synthetic in-memory samples (no
decode cost; isolates the model and the parallel layout) or the job's real data. Speed
and memory ratios against a baseline measured in the same run:

* ``baseline="hf"``: the same model size, batch, frozen/trained split and dtype through
  ``transformers``' Blip2ForConditionalGeneration, in a child process (one device);
* ``baseline="replicated"`` (TP > 1): the same layout with every TP rank encoding all the
  images (``model.tp_split_images=false``), then split as by default.

``profile=True`` runs a few more steps of each side under torch.profiler after the measured
ones (so the profiler's overhead stays out of the figures) and reports where the step
goes: the op time per step, the share of it in the dense kernels both stacks must run
(matmuls, attention, convolutions), the costliest ops, and their full table in a text file.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from blip2_megatron import accelerator
from blip2_megatron.config import JobConfig
from blip2_megatron.data.batch import build_batch_builder
from blip2_megatron.parallel import state
from blip2_megatron.parallel.state import launch_env
from blip2_megatron.parallel.tp_split import loader_image_rows
from blip2_megatron.training.ds_config import check_layout, read_ds_config
from blip2_megatron.training.engine import build_engine
from blip2_megatron.training.throughput import StepTiming, add_flops, model_flops_utilization, part_precisions

logger = logging.getLogger(__name__)

_CAPTIONS = [
    "a red circle on the left of a plain background",
    "a small blue square at the top",
    "there is a large green triangle in the center",
    "a picture of a small yellow circle",
]


def synthetic_samples(job: JobConfig, seed: int = 0) -> dict[str, Any]:
    """Fixed in-memory samples (images and captions) of the job's micro-batch size and image size."""
    gen = torch.Generator().manual_seed(seed)
    size = job.model.vision.image_size
    batch = job.data.batch_size
    return {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "text_input": [_CAPTIONS[i % len(_CAPTIONS)] for i in range(batch)],
        "image_id": list(range(batch)),
        "sample_key": [f"synthetic/{i}" for i in range(batch)],  # seeds per-sample prompt draws
    }


def _batches(job: JobConfig, use_real_data: bool):
    builder = build_batch_builder(job.model)
    if use_real_data:
        from blip2_megatron.data.loader import build_train_loader

        rows = loader_image_rows(job.model, job.data.batch_size)
        loader = build_train_loader(job.data, state.dp_rank(), state.dp_size(), job.train.seed, builder, rows)
        return loader.endless()
    return itertools.repeat(builder(synthetic_samples(job, seed=state.dp_rank())))


#: Ops whose self time is the dense math any implementation of the model runs.
_DENSE_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation"}
_DENSE_OP_PARTS = ("convolution", "scaled_dot_product", "flash_attention", "efficient_attention")


def profile_steps(steps: int) -> int:
    """How many profiled steps follow the measured ones."""
    return min(steps, 3)


def profiled_steps(step: Callable[[], Any], steps: int) -> dict[str, Any]:
    """:func:`profile_summary` of :func:`profile_steps` calls of ``step`` (after the measured ``steps``)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if accelerator.device_type() == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    count = profile_steps(steps)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(count):
            step()
    return profile_summary(prof, count)


def profile_summary(prof: torch.profiler.profile, steps: int) -> dict[str, Any]:
    """Per step: op self time, the dense kernels' part of it, the ten costliest ops; and the op table.

    Self time is the device's on a GPU (kernels run asynchronously), the host's elsewhere.
    """
    on_device = accelerator.device_type() == "cuda"
    sort_key = "self_device_time_total" if on_device else "self_cpu_time_total"
    events = prof.key_averages()

    def seconds(event: Any) -> float:
        return getattr(event, sort_key) / 1e6 / steps

    total = sum(seconds(event) for event in events)
    dense = sum(
        seconds(event)
        for event in events
        if event.key in _DENSE_OPS or any(part in event.key for part in _DENSE_OP_PARTS)
    )
    costliest = sorted(events, key=seconds, reverse=True)[:10]
    return {
        "steps": steps,
        "op_time_s": total,
        "dense_time_s": dense,
        "dense_share": dense / total if total else None,
        "top_ops": [[event.key, seconds(event)] for event in costliest],
        "table": events.table(sort_by=sort_key, row_limit=40),
    }


def _measure(
    engine, batches, steps: int, warmup: int, profile: bool = False
) -> tuple[list[StepTiming], list[Any], dict[str, Any] | None]:
    """Step timings (the device synchronised after each phase) and results after warm-up,
    and with ``profile`` the :func:`profile_summary` of :func:`profile_steps` more steps."""
    timings, results = [], []
    for index in range(warmup + steps):
        result = engine.step(batches, sync_timing=True)
        if index >= warmup:
            timings.append(result.timing)
            results.append(result)
    profiled = profiled_steps(lambda: engine.step(batches, sync_timing=True), steps) if profile else None
    return timings, results, profiled


def _mean_timing(timings: list[StepTiming]) -> StepTiming:
    n = len(timings)
    return StepTiming(
        data=sum(t.data for t in timings) / n,
        forward=sum(t.forward for t in timings) / n,
        backward=sum(t.backward for t in timings) / n,
        optimizer=sum(t.optimizer for t in timings) / n,
    )


def benchmark_ours(
    job: JobConfig,
    ds_raw: dict[str, Any],
    steps: int,
    warmup: int,
    use_real_data: bool,
    profile: bool = False,
) -> dict[str, Any]:
    """FPS and the step breakdown of this stack (all ranks; figures reduced on rank 0).

    torch.distributed and megatron-core's groups must be running in ``job``'s layout.
    """
    accelerator.manual_seed(job.train.seed)
    accelerator.reset_peak_memory()
    total_steps = warmup + steps + (profile_steps(steps) if profile else 0)
    engine = build_engine(job, ds_raw, total_steps=total_steps, steps_per_epoch=total_steps)
    timings, results, profiled = _measure(engine, _batches(job, use_real_data), steps, warmup, profile)
    engine.ds.destroy()
    mean = _mean_timing(timings)
    world = dist.get_world_size()
    fps = job.data.batch_size * job.train.grad_accum * state.dp_size() / mean.total
    # Every DP rank runs batches of the same shape here: this rank's FLOPs x DP per step.
    flops = {part: value * state.dp_size() / len(results) for part, value in _sum_flops(results).items()}
    # Read before MFU: on CPU the peak rate is measured, and its large products would move
    # the allocator's thresholds inside the memory window.
    peak_mem_gb = accelerator.peak_memory_bytes() / 2**30
    precisions = part_precisions(job.model, job.train.precision)
    return {
        "fps": fps,
        "fps_per_device": fps / world,
        "step_time": mean.total,
        "data_time": mean.data,
        # The pipeline engine interleaves forward, backward and the step: one figure for all.
        **(
            {"pipelined_time": mean.forward}
            if job.pp > 1
            else {
                "forward_time": mean.forward,
                "backward_time": mean.backward,
                "optimizer_time": mean.optimizer,
            }
        ),
        "tflops_per_device": sum(flops.values()) / mean.total / world / 1e12,
        "mfu": model_flops_utilization(flops, precisions, mean.total, world),
        "peak_mem_gb": peak_mem_gb,
        "final_loss": float(results[-1].losses["loss"]),
        "trainable_params": sum(p.numel() for p in engine.model.parameters() if p.requires_grad),
        **({"profile": profiled} if profiled else {}),
    }


def _sum_flops(results: list[Any]) -> dict[str, float]:
    total: dict[str, float] = {}
    for result in results:
        add_flops(total, result.flops)
    return total


def _hf_worker(job_dict: dict[str, Any], steps: int, warmup: int, profile: bool, queue: Any) -> None:
    """Child process: the transformers baseline (one device, same batch and split)."""
    try:
        queue.put(("ok", _hf_benchmark(job_dict, steps, warmup, profile)))
    except Exception as err:  # noqa: BLE001 - reported back to the parent
        queue.put(("error", repr(err)))


def _hf_benchmark(job_dict: dict[str, Any], steps: int, warmup: int, profile: bool = False) -> dict[str, Any]:
    from transformers import Blip2ForConditionalGeneration

    from blip2_megatron.config import job_config_from_dict
    from blip2_megatron.convert.hf_blip2 import hf_config_from_ours, hf_inputs_from_batch
    from blip2_megatron.training.optim import build_optimizer

    job = job_config_from_dict(job_dict)
    accelerator.reset_peak_memory()
    torch.manual_seed(job.train.seed)
    hf_cfg = hf_config_from_ours(job.model)
    device = accelerator.current_device()
    model = Blip2ForConditionalGeneration(hf_cfg).to(device)
    # Like for like: the same frozen/trained split as ours, frozen parts in the dtypes ours
    # keeps them in (the LLM wholly in llm.dtype; a frozen ViT's Linear/Conv weights in
    # vision.frozen_dtype, as LAVIS halves them), activation checkpointing where ours has
    # it, and the batch copied to the device every step as our loader's batches are.
    # (Mixed dtypes need autocast in transformers' modules: in fp32 everything stays fp32.)
    half = job.train.precision != "fp32"
    if job.model.vision.freeze:
        model.vision_model.requires_grad_(False).eval()
        for module in model.vision_model.modules():
            if half and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                module.to(accelerator.weight_dtype(job.model.vision.frozen_dtype))
    elif job.model.vision.grad_checkpointing:
        model.vision_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    if job.model.llm.freeze:
        model.language_model.requires_grad_(False)
        if half:
            model.language_model.to(accelerator.weight_dtype(job.model.llm.weight_dtype_name))
    model.train()
    if job.model.vision.freeze:
        model.vision_model.eval()
    optimizer = build_optimizer(model, job.train)
    tokenizer = build_batch_builder(job.model).tokenizer
    host_inputs = hf_inputs_from_batch(job.model, tokenizer, synthetic_samples(job), hf_cfg)
    dtype = accelerator.DTYPE_BY_NAME[job.train.precision]

    def step() -> tuple[StepTiming, torch.Tensor]:
        timing = StepTiming()
        start = time.perf_counter()
        inputs = {k: v.to(device, non_blocking=True) for k, v in host_inputs.items()}
        with accelerator.autocast(dtype):
            loss = model(**inputs).loss
        accelerator.synchronize()
        timing.forward = time.perf_counter() - start
        start = time.perf_counter()
        loss.backward()
        accelerator.synchronize()
        timing.backward = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accelerator.synchronize()
        timing.optimizer = time.perf_counter() - start
        return timing, loss

    timings = []
    for index in range(warmup + steps):
        timing, loss = step()
        if index >= warmup:
            timings.append(timing)
    profiled = profiled_steps(step, steps) if profile else None
    mean = _mean_timing(timings)
    fps = job.data.batch_size / mean.total
    return {
        "fps": fps,
        "step_time": mean.total,
        "forward_time": mean.forward,
        "backward_time": mean.backward,
        "optimizer_time": mean.optimizer,
        "final_loss": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
        **({"profile": profiled} if profiled else {}),
    }


def benchmark_hf(job: JobConfig, steps: int, warmup: int, profile: bool = False) -> dict[str, Any]:
    """Run the transformers baseline in a fresh process (clean memory peak) and return its figures."""
    from blip2_megatron.config import job_config_to_dict

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_hf_worker, args=(job_config_to_dict(job), steps, warmup, profile, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"transformers baseline failed: {value}")
    return value


BASELINE_LABELS = {"hf": "transformers", "replicated": "replicated img"}


def format_table(ours: dict[str, Any], baseline: dict[str, Any] | None, label: str = "transformers") -> str:
    rows = [
        ("FPS (images/s, global)", "fps", "{:.2f}"),
        ("FPS per device", "fps_per_device", "{:.2f}"),
        ("step time (s)", "step_time", "{:.4f}"),
        ("  data (s)", "data_time", "{:.4f}"),
        ("  forward (s)", "forward_time", "{:.4f}"),
        ("  backward (s)", "backward_time", "{:.4f}"),
        ("  optimizer (s)", "optimizer_time", "{:.4f}"),
        ("  fwd+bwd+step, pipelined", "pipelined_time", "{:.4f}"),
        ("TFLOP/s per device", "tflops_per_device", "{:.4f}"),
        ("MFU", "mfu", "{:.1%}"),
        ("peak memory (GB)", "peak_mem_gb", "{:.3f}"),
        ("trainable params", "trainable_params", "{:,}"),
    ]

    def cell(data: dict[str, Any] | None, key: str, fmt: str) -> str:
        value = None if data is None else data.get(key)
        return "n/a" if value is None else fmt.format(value)

    header = f"| {'metric':<24} | {'blip2-megatron':>15} |" + (
        f" {label:>14} | {'ratio':>7} |" if baseline else ""
    )
    lines = [
        header,
        "|" + "-" * 26 + "|" + "-" * 17 + "|" + ("-" * 16 + "|" + "-" * 9 + "|" if baseline else ""),
    ]
    for label, key, fmt in rows:
        if key not in ours and (baseline is None or key not in baseline):
            continue
        line = f"| {label:<24} | {cell(ours, key, fmt):>15} |"
        if baseline:
            ratio = ""
            if key in ("fps", "peak_mem_gb") and baseline.get(key) and ours.get(key):
                ratio = f"{ours[key] / baseline[key]:.2f}x"
            line += f" {cell(baseline, key, fmt):>14} | {ratio:>7} |"
        lines.append(line)
    return "\n".join(lines)


def round_ratios(our_runs: list[dict[str, Any]], baseline_runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Speed and memory ratios (ours / baseline) of each round, and their median and range.

    The rounds ran in turn (baseline, then ours), so each round's ratio compares two runs
    that met the same minute of a shared machine; the median over rounds is the figure to
    quote, with its range [lowest, highest]. Memory is None where either side's peak was
    not measured (replicated on CPU: both sides share one process's resident memory).
    """
    speeds = [ours["fps"] / base["fps"] for ours, base in zip(our_runs, baseline_runs)]
    memories = [
        ours["peak_mem_gb"] / base["peak_mem_gb"]
        for ours, base in zip(our_runs, baseline_runs)
        if ours.get("peak_mem_gb") and base.get("peak_mem_gb")
    ]
    return {
        "rounds": len(speeds),
        "speed": statistics.median(speeds),
        "speed_range": [min(speeds), max(speeds)],
        "speed_by_round": speeds,
        "memory": statistics.median(memories) if memories else None,
        "memory_range": [min(memories), max(memories)] if memories else None,
        "memory_by_round": memories or None,
    }


def format_round_ratios(ratios: dict[str, Any]) -> str:
    """The summary lines under the table: each ratio's median, range and rounds."""

    def line(name: str) -> str:
        median, by_round = ratios[name], ratios[f"{name}_by_round"]
        if median is None:
            return f"{name} ratio: not measured"
        if len(by_round) == 1:
            return f"{name} ratio: {median:.2f}x (1 round; --rounds N gives a median and range)"
        low, high = ratios[f"{name}_range"]
        rounds = ", ".join(f"{r:.2f}x" for r in by_round)
        return (
            f"{name} ratio: median {median:.2f}x, range {low:.2f}x-{high:.2f}x over {len(by_round)} rounds "
            f"(by round: {rounds})"
        )

    fastest = ratios.get("speed_fastest")
    note = (
        f"; the table holds each side's fastest round ({fastest:.2f}x)"
        if fastest is not None and ratios["rounds"] > 1
        else ""
    )
    return f"{line('speed')}{note}\n{line('memory')}"


def _best_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The fastest of several rounds; memory from the first (later rounds start in a used process)."""
    best = max(runs, key=lambda run: run["fps"])
    return {**best, "peak_mem_gb": runs[0]["peak_mem_gb"], "fps_by_round": [run["fps"] for run in runs]}


def run_benchmark(
    job: JobConfig,
    ds_config_path: str,
    steps: int,
    warmup: int,
    use_real_data: bool = False,
    baseline: str | None = None,
    out_json: Path | None = None,
    rounds: int = 1,
    profile: bool = False,
) -> dict[str, Any]:
    """Benchmark ``job``; return (and on rank 0 write) {"ours": ..., "baseline": ..., "ratios": ...}.

    With a baseline, ``rounds`` > 1 alternates baseline and ours that many times. The
    ratios (:func:`round_ratios`) pair each round's two sides, which ran minutes apart at
    most, and report their median and range: on a shared machine whole minutes run slower
    than others (measured here: the same tiny job at 500 to 730 images/s in successive
    runs), so one round's ratio, or each side's fastest round, can mislead. The table holds
    each side's fastest round; ``ratios["speed_fastest"]`` is their quotient.
    """
    if baseline == "hf" and launch_env().world_size != 1:
        raise ValueError("--baseline hf compares single-device runs; launch with one process")
    if baseline == "replicated" and job.tp == 1:
        raise ValueError(
            "--baseline replicated compares image encoding split over TP ranks with "
            "every TP rank encoding all images; it needs model.llm.tp > 1"
        )
    replicated = dataclasses.replace(job, model=dataclasses.replace(job.model, tp_split_images=False))
    baseline_runs: list[dict[str, Any]] = []
    our_runs: list[dict[str, Any]] = []
    ds_raw = None
    for round_index in range(rounds if baseline else 1):
        profiled = profile and round_index == 0
        if baseline == "hf":
            # The first round's runs first, while this process is still small: on Linux a
            # child inherits its parent's peak RSS across fork/exec as a floor.
            baseline_runs.append(benchmark_hf(job, steps, warmup, profiled))
        if ds_raw is None:
            state.init_distributed(job.train.collective_timeout_s)
            ds_raw = read_ds_config(ds_config_path)
            check_layout(job, ds_raw, dist.get_world_size())
            state.initialize_model_parallel(job.tp, job.pp)
        if baseline == "replicated":
            baseline_runs.append(benchmark_ours(replicated, ds_raw, steps, warmup, use_real_data, profiled))
        our_runs.append(benchmark_ours(job, ds_raw, steps, warmup, use_real_data, profiled))
    profiles = (
        {
            side: runs[0].pop("profile")
            for side, runs in (("ours", our_runs), ("baseline", baseline_runs))
            if runs
        }
        if profile
        else {}
    )
    ours = _best_round(our_runs)
    baseline_figures = _best_round(baseline_runs) if baseline_runs else None
    if baseline == "replicated" and accelerator.is_cpu():
        # Both ran in this process, and on CPU the peak is resident memory, which the first
        # run's freed memory keeps high: no meaningful comparison (a GPU's peak resets).
        ours["peak_mem_gb"] = baseline_figures["peak_mem_gb"] = None
    result: dict[str, Any] = {
        "job": job.name,
        "flavour": job.flavour,
        "steps": steps,
        "warmup": warmup,
        "rounds": len(our_runs),
        "data": "real" if use_real_data else "synthetic",
        "world_size": dist.get_world_size(),
        "tp": job.tp,
        "pp": job.pp,
        "dp": state.dp_size(),
        "precision": job.train.precision,
        "device": accelerator.device_name_for_peak(),
        "ours": ours,
        "baseline": baseline_figures,
        "baseline_kind": baseline,
    }
    if profiles:
        result["profile"] = {
            side: {key: value for key, value in summary.items() if key != "table"}
            for side, summary in profiles.items()
        }
    if baseline_figures is not None:
        result["ratios"] = round_ratios(our_runs, baseline_runs)
        result["ratios"]["speed_fastest"] = ours["fps"] / baseline_figures["fps"]
    if dist.get_rank() == 0:
        label = BASELINE_LABELS.get(baseline or "hf")
        table = format_table(ours, baseline_figures, label)
        if baseline_figures is not None:
            table += "\n" + format_round_ratios(result["ratios"])
        if profiles:
            table += "\n" + format_profiles(profiles, BASELINE_LABELS.get(baseline or "hf"))
        logger.info("\n%s", table)
        if out_json is not None:
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(result, indent=2))
            if profiles:
                tables = "\n\n".join(f"== {side}\n{summary['table']}" for side, summary in profiles.items())
                profile_path(out_json).write_text(tables + "\n")
    return result


def profile_path(out_json: Path) -> Path:
    """Where the profiled ops' tables go, beside the figures."""
    return out_json.with_name(f"{out_json.stem}_profile.txt")


def format_profiles(profiles: dict[str, dict[str, Any]], label: str) -> str:
    """Where each side's step goes; with a baseline, the speed ratio if only dense kernels remained."""
    names = {"ours": "blip2-megatron", "baseline": label}
    lines = []
    for side, summary in profiles.items():
        top = ", ".join(f"{name} {seconds:.4f}" for name, seconds in summary["top_ops"][:5])
        share = summary["dense_share"]
        lines.append(
            f"profile of {names[side]} ({summary['steps']} steps): {summary['op_time_s']:.4f} s of ops per step, "
            f"{summary['dense_time_s']:.4f} s ({share:.0%}) in matmul / attention / convolution kernels; "
            f"costliest (s): {top}"
            if share is not None
            else f"profile of {names[side]}: no ops recorded"
        )
    if "baseline" in profiles and profiles["ours"]["dense_time_s"]:
        ceiling = profiles["baseline"]["op_time_s"] / profiles["ours"]["dense_time_s"]
        lines.append(
            f"ceiling: running nothing but its dense kernels, blip2-megatron would be {ceiling:.2f}x as fast "
            f"as {label} (that side's op time over our dense kernels' time)"
        )
    return "\n".join(lines)
