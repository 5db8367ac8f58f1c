"""Generation benchmark: our ``generate`` against transformers' on the same weights and inputs.

Each side lives in its own worker process (its peak memory is its own; on CPU a process's
freed memory keeps its resident size high), holding its model between calls:

* ours: the job's model built as evaluation builds it (``inference_config``, TP 1), in
  eval mode, generating through :class:`~blip2_megatron.inference.Blip2Predictor`;
* transformers: ``Blip2ForConditionalGeneration.from_pretrained`` of our model exported
  with :func:`~blip2_megatron.convert.hf_blip2.export_hf_blip2`, each parameter cast to the
  dtype ours holds it in, generating under the same autocast dtype.

Both get the same images, the same prompt laid out by our batch builder (transformers gets
its image-token placeholders in the query slots), the same beams and ``min_new_tokens =
max_new_tokens`` so that both generate exactly that many tokens. Each round runs every
decoding mode once on each side in turn (transformers first), so the two calls of a mode
meet the same minute of a shared machine; a round's ratio pairs them, and the median and
range over rounds are the figures to quote (:func:`~blip2_megatron.training.benchmark.round_ratios`).
Tokens are compared position by position where both sides generated one.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from blip2_megatron import accelerator
from blip2_megatron.config import JobConfig
from blip2_megatron.training.benchmark import format_round_ratios, round_ratios

logger = logging.getLogger(__name__)

SIDES = ("transformers", "ours")
SIDE_LABELS = {"ours": "blip2-megatron", "transformers": "transformers"}


def _mode_name(num_beams: int) -> str:
    return "greedy" if num_beams == 1 else f"beam {num_beams}"


def benchmark_images(job: JobConfig, seed: int = 0) -> torch.Tensor:
    """The fixed batch of images both sides caption: ``[batch, 3, size, size]``."""
    size = job.model.vision.image_size
    return torch.randn(job.data.batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed))


def benchmark_prompt(job: JobConfig) -> str:
    return job.model.prompt


class _OurSide:
    """The job's model as evaluation runs it (whole, TP 1), written out for transformers too."""

    def __init__(self, job: JobConfig, hf_dir: Path):
        from blip2_megatron.build import build_model, inference_config, predictor_for
        from blip2_megatron.convert.hf_blip2 import export_hf_blip2
        from blip2_megatron.parallel import state

        state.init_distributed(job.train.collective_timeout_s)
        job.model = inference_config(job.model, 1, tp=1)
        state.initialize_model_parallel(1, 1)
        accelerator.manual_seed(job.train.seed)
        model = build_model(job.model, device=accelerator.current_device()).eval()
        compute_dtype = accelerator.inference_dtype(job.eval.precision, job.train.precision)
        self.predictor = predictor_for(model, job.model, compute_dtype=compute_dtype)
        self.compute_dtype = compute_dtype
        export_hf_blip2(model, hf_dir, tokenizer=self.predictor.tokenizer)
        self.images = benchmark_images(job).to(accelerator.current_device())
        self.prompt = benchmark_prompt(job)

    def generate(self, num_beams: int, new_tokens: int) -> torch.Tensor:
        return self.predictor.generate_tokens(
            {"image": self.images},
            prompt=self.prompt,
            num_beams=num_beams,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            length_penalty=1.0,
        )


class _TransformersSide:
    """transformers' Blip2ForConditionalGeneration on our exported weights, in our dtypes."""

    def __init__(self, job: JobConfig, hf_dir: Path):
        from safetensors import safe_open
        from transformers import Blip2ForConditionalGeneration

        from blip2_megatron.data.batch import build_batch_builder

        device = accelerator.current_device()
        model = Blip2ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32)
        with safe_open(str(hf_dir / "model.safetensors"), "pt") as weights:
            stored = {name: weights.get_slice(name).get_dtype() for name in weights.keys()}  # noqa: SIM118
        dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
        for name, param in model.named_parameters():
            if name in stored:  # a tied head is stored once, under the embedding's name
                param.data = param.data.to(dtypes[stored[name]])
        self.model = model.to(device).eval()
        self.compute_dtype = accelerator.inference_dtype(job.eval.precision, job.train.precision)
        builder = build_batch_builder(job.model)
        inputs = builder.generation_inputs([benchmark_prompt(job)] * job.data.batch_size)
        image_token = self.model.config.image_token_index
        self.input_ids = inputs["input_ids"].masked_fill(inputs["image_slots"], image_token).to(device)
        self.attention_mask = inputs["attention_mask"].to(device)
        self.images = benchmark_images(job).to(device)

    @torch.no_grad()
    def generate(self, num_beams: int, new_tokens: int) -> torch.Tensor:
        with accelerator.autocast(self.compute_dtype):
            out = self.model.generate(
                pixel_values=self.images,
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                num_beams=num_beams,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                length_penalty=1.0,
                do_sample=False,
            )
        return out[:, self.input_ids.shape[1] :]  # transformers returns the prompt too


def _timed(side: Any, num_beams: int, new_tokens: int, profile: bool) -> dict[str, Any]:
    """One generate call: its seconds, peak memory, tokens and (with ``profile``) op table."""
    accelerator.synchronize()
    accelerator.reset_peak_memory()
    start = time.perf_counter()
    tokens = side.generate(num_beams, new_tokens)
    accelerator.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_mem_gb": accelerator.peak_memory_bytes() / 2**30,
        "tokens": tokens.cpu().tolist(),
    }
    if profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            side.generate(num_beams, new_tokens)
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    return result


def _worker(name: str, job_dict: dict[str, Any], hf_dir: str, conn: Any) -> None:
    """Child process: build one side, then answer ("run", beams, tokens, profile) until ("stop",)."""
    from blip2_megatron.config import job_config_from_dict

    try:
        job = job_config_from_dict(job_dict)
        side = (_OurSide if name == "ours" else _TransformersSide)(job, Path(hf_dir))
        conn.send(("ok", None))
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            _, num_beams, new_tokens, profile = message
            conn.send(("ok", _timed(side, num_beams, new_tokens, profile)))
    except Exception as err:  # noqa: BLE001 - reported back to the parent
        conn.send(("error", f"{name}: {err!r}"))
    finally:
        conn.close()


class _Worker:
    def __init__(self, name: str, job_dict: dict[str, Any], hf_dir: Path):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(name, job_dict, str(hf_dir), child), daemon=True)
        self.proc.start()
        child.close()
        self._answer()

    def _answer(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"the {self.name} worker exited (code {self.proc.exitcode})") from None
        if status != "ok":
            raise RuntimeError(f"generation benchmark worker failed: {value}")
        return value

    def run(self, num_beams: int, new_tokens: int, profile: bool = False) -> dict[str, Any]:
        self.conn.send(("run", num_beams, new_tokens, profile))
        return self._answer()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
        self.proc.join(timeout=60)


def compare_tokens(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """Position-by-position agreement where both sides generated a token."""
    compared = differing = 0
    for row_ours, row_theirs in zip(ours, theirs):
        length = min(len(row_ours), len(row_theirs))
        compared += length
        differing += sum(a != b for a, b in zip(row_ours[:length], row_theirs[:length]))
    same_shape = len(ours) == len(theirs) and all(len(a) == len(b) for a, b in zip(ours, theirs))
    return {
        "identical": same_shape and differing == 0,
        "compared": compared,
        "differing": differing,
        "rows": len(ours),
        "lengths": sorted({len(row) for row in ours}),
    }


def _figures(run: dict[str, Any], images: int) -> dict[str, Any]:
    generated = sum(len(row) for row in run["tokens"])
    return {
        "tokens_per_s": generated / run["seconds"],
        "images_per_s": images / run["seconds"],
        "seconds": run["seconds"],
        "peak_mem_gb": run["peak_mem_gb"],
    }


def _median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("tokens_per_s", "images_per_s", "seconds", "peak_mem_gb")
    return {key: statistics.median(run[key] for run in runs) for key in keys}


def format_generation_table(mode: str, result: dict[str, Any], images: int, new_tokens: int) -> str:
    ours, theirs = result["ours"], result["transformers"]
    rows = [
        ("tokens/s", "tokens_per_s", "{:.1f}"),
        ("images/s", "images_per_s", "{:.3f}"),
        ("seconds per batch", "seconds", "{:.3f}"),
        ("peak memory (GB)", "peak_mem_gb", "{:.3f}"),
    ]
    lines = [
        f"generation, {mode} ({images} images, {new_tokens} new tokens each; medians over rounds)",
        f"| {'metric':<20} | {'blip2-megatron':>15} | {'transformers':>14} | {'ratio':>7} |",
        "|" + "-" * 22 + "|" + "-" * 17 + "|" + "-" * 16 + "|" + "-" * 9 + "|",
    ]
    for label, key, fmt in rows:
        ratio = ours[key] / theirs[key] if theirs[key] else None
        ratio_text = f"{ratio:.2f}x" if ratio is not None else ""
        lines.append(
            f"| {label:<20} | {fmt.format(ours[key]):>15} | {fmt.format(theirs[key]):>14} | {ratio_text:>7} |"
        )
    tokens = result["tokens"]
    verdict = "identical" if tokens["identical"] else f"DIFFERENT at {tokens['differing']} positions"
    lines.append(format_round_ratios(result["ratios"]))
    lines.append(f"tokens: {verdict} ({tokens['rows']} rows, {tokens['compared']} positions compared)")
    return "\n".join(lines)


def run_generation_benchmark(
    job: JobConfig,
    out_json: Path | None = None,
    rounds: int = 3,
    beams: tuple[int, ...] = (1, 5),
    new_tokens: int = 20,
    warmup: int = 1,
    profile: bool = False,
) -> dict[str, Any]:
    """Time both sides' generation (see the module docstring); return and write the figures.

    ``warmup`` untimed calls of each mode on each side come first (allocator and kernel
    caches). With ``profile``, one more call per side and mode runs under torch.profiler
    after the first round; the op tables go to ``<out stem>_profile.txt``.
    """
    from blip2_megatron.config import job_config_to_dict

    if rounds < 1 or new_tokens < 1 or not beams:
        raise ValueError("need rounds >= 1, new_tokens >= 1 and at least one beam count")
    job_dict = job_config_to_dict(job)
    images = job.data.batch_size
    with tempfile.TemporaryDirectory(prefix="blip2_generation_benchmark_") as tmp:
        hf_dir = Path(tmp) / "hf"
        workers: dict[str, _Worker] = {}
        try:
            workers["ours"] = _Worker("ours", job_dict, hf_dir)  # writes hf_dir
            workers["transformers"] = _Worker("transformers", job_dict, hf_dir)
            for num_beams in beams:
                for _ in range(warmup):
                    for name in SIDES:
                        workers[name].run(num_beams, new_tokens)
            runs: dict[int, dict[str, list[dict[str, Any]]]] = {b: {s: [] for s in SIDES} for b in beams}
            profiles: dict[str, str] = {}
            for round_index in range(rounds):
                for num_beams in beams:
                    for name in SIDES:
                        run = workers[name].run(num_beams, new_tokens, profile and round_index == 0)
                        if "profile" in run:
                            profiles[f"{SIDE_LABELS[name]}, {_mode_name(num_beams)}"] = run.pop("profile")
                        runs[num_beams][name].append(run)
        finally:
            for worker in workers.values():
                worker.stop()

    result: dict[str, Any] = {
        "job": job.name,
        "batch": images,
        "new_tokens": new_tokens,
        "rounds": rounds,
        "warmup": warmup,
        "precision": job.train.precision,
        "device": accelerator.device_name_for_peak(),
        "modes": {},
    }
    tables = []
    for num_beams in beams:
        mode = _mode_name(num_beams)
        figures = {name: [_figures(run, images) for run in runs[num_beams][name]] for name in SIDES}
        ratios = round_ratios(
            [{"fps": f["tokens_per_s"], "peak_mem_gb": f["peak_mem_gb"]} for f in figures["ours"]],
            [{"fps": f["tokens_per_s"], "peak_mem_gb": f["peak_mem_gb"]} for f in figures["transformers"]],
        )
        last = {name: runs[num_beams][name][-1]["tokens"] for name in SIDES}
        tokens = compare_tokens(last["ours"], last["transformers"])
        tokens["identical_every_round"] = all(
            compare_tokens(o["tokens"], t["tokens"])["identical"]
            for o, t in zip(runs[num_beams]["ours"], runs[num_beams]["transformers"])
        )
        tokens["distinct_tokens"] = len({token for row in last["ours"] for token in row})
        mode_result = {
            "num_beams": num_beams,
            "ours": _median_figures(figures["ours"]),
            "transformers": _median_figures(figures["transformers"]),
            "by_round": figures,
            "ratios": ratios,
            "tokens": tokens,
        }
        result["modes"][mode] = mode_result
        tables.append(format_generation_table(mode, mode_result, images, new_tokens))
    logger.info("\n%s", "\n\n".join(tables))
    if out_json is not None:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result, indent=2))
        if profiles:
            text = "\n\n".join(f"== {name}\n{table}" for name, table in profiles.items())
            out_json.with_name(f"{out_json.stem}_profile.txt").write_text(text + "\n")
    return result
