"""Every command of the README runs, in order, the way a user types it (so the README cannot rot).

The README's ``bash`` and ``python`` blocks are read from the file itself and run in a
scratch directory that holds the repository's ``launch/``, ``ds_configs/`` and
``data_tools/`` (so ``runs/`` and ``data/`` are the scratch directory's) with the built-in
data in place. Where a command names something a fresh machine does not have, it gets a
tiny stand-in, written out in :data:`SUBSTITUTIONS` and :func:`_tiny_job_overrides`:

* real weights (``/models/blip2-opt-2.7b``) -> a tiny transformers Blip2 directory;
* a shipped job on real weights and data -> the same job at tiny size on the built-in data
  (``journeys.tiny_overrides``), a few steps;
* a URL list (``laion.parquet``) -> one served from 127.0.0.1; ``/data/...`` -> scratch folders;
* 8 processes -> 2 (this machine has 2 cores);
* benchmarks' rounds -> 1; the mid-size benchmarks' 4 measured steps after 2 warm-up steps -> 1 step,
  and the mid-size model's 12 layers per part -> 2;
  the loader benchmark's 64 images -> 32.

The default job (the first command) runs whole and must learn: CIDEr on the held-out val
split far above the untrained model's. Other training commands run a few steps. The
layout commands whose runs no later command reads are run by ``test_journey_layouts.py``
(same launcher, same config and layout, plus resume checks); this test checks that each
of them is there. ``sbatch`` lines are run by the SLURM tests; this test checks that each
script and its options are exercised there. The install line is what ``.ci/run`` runs.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from journeys import REPO, env, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.journey]

README = REPO / "README.md"
TINY_BLIP2 = "/models/blip2-opt-2.7b"
SUBSTITUTIONS = {
    "--num_gpus 8": "--num_gpus 2",
    "/data/laion": "{scratch}/laion",
    "/data/coco_wds": "{scratch}/coco_wds",
    TINY_BLIP2: "{scratch}/blip2-opt-tiny",
    # Benchmarks: one round each; the mid-size ones (seconds per step on 2 cores) one step,
    # the mid-size model with 2 of its 12 layers in each part (its widths and vocabulary kept).
    "--config bench_midsize": (
        "--config bench_midsize model.vision.num_layers=2 model.qformer.num_layers=2 model.llm.num_layers=2"
    ),
    "--steps 4 --warmup 2 --rounds 2": "--steps 1 --warmup 0 --rounds 1",
    "--rounds 3": "--rounds 1",
    "--num-images 64 --repeats 3": "--num-images 32 --repeats 1",
}
TRAIN_STEPS = ["train.max_steps=6", "train.log_interval=2", "eval.max_samples=4", "eval.num_beams=2"]
SHIPPED_TINY = {"tiny_stage1", "tiny_stage2"}


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, trailing comments removed, in order."""
    lines = []
    for block in readme_blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s{2,}#.*$", "", line).strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _tiny_job_overrides(words: list[str], sample) -> list[str]:
    """The command with a shipped non-tiny job made tiny (its own overrides still win: they come after)."""
    if "--config" not in words:
        return words
    at = words.index("--config") + 1
    job = words[at]
    if job in SHIPPED_TINY:
        return words
    return [*words[: at + 1], *tiny_overrides(job, sample), *words[at + 1 :]]


def _output_dir(words: list[str]) -> str:
    for word in words:
        if word.startswith("train.output_dir="):
            return word.split("=", 1)[1]
    job = words[words.index("--config") + 1] if "--config" in words else "tiny_stage2"
    return f"runs/{job}"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, sample):
    """A working directory like a fresh clone's, with the stand-ins the README's commands need."""
    root = tmp_path_factory.mktemp("readme")
    for name in ("launch", "ds_configs", "data_tools"):
        (root / name).symlink_to(REPO / name)
    (root / "data").mkdir()
    (root / "data" / "sample_dataset").symlink_to(sample.root)
    (root / "photo.jpg").write_bytes((Path(sample.image_root) / "val" / "000001.jpg").read_bytes())
    _write_tiny_blip2(root / "blip2-opt-tiny")
    return root


def _write_tiny_blip2(path: Path) -> None:
    """A random tiny transformers Blip2 (OPT) directory with the built-in tokenizer: what a user downloads."""
    import torch
    import transformers

    from blip2_megatron.config import build_model_config
    from blip2_megatron.convert.hf_blip2 import hf_config_from_ours
    from blip2_megatron.data.tokenizers import build_tokenizer

    torch.manual_seed(0)
    transformers.Blip2ForConditionalGeneration(
        hf_config_from_ours(build_model_config("tiny"))
    ).save_pretrained(path)
    build_tokenizer("builtin:tiny", "llm").save_pretrained(path)


@pytest.fixture(scope="module")
def url_list(scratch, sample):
    """laion.parquet with image URLs served from 127.0.0.1 (one of them missing, as in real lists)."""
    import pandas as pd

    site = scratch / "site"
    site.mkdir()
    for index in range(6):
        name = f"{index + 1:06d}.jpg"
        (site / name).write_bytes((Path(sample.image_root) / "val" / name).read_bytes())
    from blip2_megatron.parallel.state import free_port

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    urls = [f"http://127.0.0.1:{port}/{index + 1:06d}.jpg" for index in range(7)]  # the 7th is a 404
    pd.DataFrame({"url": urls, "caption": [f"a shape {i}" for i in range(7)]}).to_parquet(
        scratch / "laion.parquet"
    )
    yield scratch / "laion.parquet"
    server.terminate()
    server.wait(timeout=10)


def _run(command: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command,
        shell=True,
        executable="/bin/bash",
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{command}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    )
    return proc


def test_the_two_commands_are_what_ci_runs():
    commands = readme_commands()
    assert commands[0] == "./install.sh && deepspeed launch/train.py --ds_config ds_configs/zero2.json"
    assert commands[1] == "./install.sh && python3 -m pytest -q"
    ci = (REPO / ".ci" / "run").read_text()
    assert "./install.sh" in ci and "python3 -m pytest -q" in ci


def test_sbatch_lines_are_run_by_the_slurm_tests():
    slurm_tests = "".join(p.read_text() for p in (REPO / "tests").glob("test_slurm*.py"))
    for command in readme_commands():
        if command.startswith("sbatch"):
            script = next(word for word in command.split() if word.endswith(".sbatch"))
            assert (REPO / script).is_file(), script
            assert Path(script).name in slurm_tests, f"no SLURM test submits {script}"
            if "--nodes=2" in command:
                assert "--nodes=2" in slurm_tests or '"--nodes", "2"' in slurm_tests


def test_every_readme_command_runs(scratch, url_list, sample):
    """In order: the default job whole (and it learns), then every other command."""
    from test_journey_layouts import LAYOUTS

    commands = [c for c in readme_commands() if not c.startswith("sbatch")][2:]  # after the two commands
    readme_text = README.read_text()
    main = _run("deepspeed launch/train.py --ds_config ds_configs/zero2.json", scratch)
    _check_default_job_learns(scratch, main)

    layouts = {(n, tp, pp, zero) for n, tp, pp, zero in LAYOUTS.values()}
    skipped_layouts = []
    for command in commands:
        piped_in, _, invocation = command.rpartition(" | ")  # "printf '...' | python launch/chat.py ..."
        words = shlex.split(invocation)
        if "launch/train.py" in words:
            output = _output_dir(words)
            used_later = len(re.findall(re.escape(output) + r"(?![\w.-])", readme_text)) > 1
            nproc = int(words[words.index("--num_gpus") + 1]) if "--num_gpus" in words else 1
            if not used_later and "--config" not in words:
                zero = int(re.search(r"zero(\d)\.json", command).group(1))
                tp = int(next((w.split("=")[1] for w in words if w.startswith("model.llm.tp=")), 1))
                pp = int(next((w.split("=")[1] for w in words if w.startswith("model.llm.pp=")), 1))
                assert (nproc, tp, pp, zero) in layouts, f"no journey test runs {command}"
                skipped_layouts.append(command)
                continue
            words = [*_tiny_job_overrides(words, sample), *TRAIN_STEPS]
        elif "launch/evaluate.py" in words:
            words = [*_tiny_job_overrides(words, sample), "eval.max_samples=8", "eval.num_beams=2"]
        line = " ".join(shlex.quote(w) for w in words)
        if piped_in:
            line = f"{piped_in} | {line}"
        for old, new in SUBSTITUTIONS.items():
            line = line.replace(old, new.format(scratch=scratch))
        start = time.perf_counter()
        proc = _run(line, scratch)
        _check_output(words, proc, scratch)
        print(f"{time.perf_counter() - start:6.1f} s  {command}")
    assert len(skipped_layouts) >= 4  # the DP ZeRO-0..3 commands, run by the layout journeys

    for block in readme_blocks("python"):
        code = block.replace(TINY_BLIP2, str(scratch / "blip2-opt-tiny"))
        code += (
            "\nprint(model.generate({'image': image}, prompt='a photo of', num_beams=2, max_new_tokens=5))\n"
        )
        _run(f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}", scratch)


def _check_default_job_learns(scratch: Path, proc: subprocess.CompletedProcess) -> None:
    """The learning proof: CIDEr on held-out val images, trained vs untrained."""
    stats = json.loads((scratch / "runs" / "tiny_stage2" / "summary.json").read_text())
    assert stats["steps"] == 1000 and "fps=" in proc.stdout + proc.stderr
    _run("python launch/evaluate.py --config tiny_stage2 --output runs/untrained", scratch)
    before = json.loads((scratch / "runs" / "untrained" / "eval" / "metrics_caption_val.json").read_text())
    print(
        f"val CIDEr untrained {before['CIDEr']:.3f} -> trained {stats['CIDEr']:.3f}; "
        f"BLEU-4 {before['Bleu_4']:.3f} -> {stats['Bleu_4']:.3f}"
    )
    assert before["CIDEr"] < 0.3 and stats["CIDEr"] > 1.5 and stats["CIDEr"] > 5 * before["CIDEr"]
    assert stats["Bleu_4"] > 0.3


def _check_output(words: list[str], proc: subprocess.CompletedProcess, scratch: Path) -> None:
    """A few facts per tool, so a command that does nothing useful does not pass."""
    out = proc.stdout + proc.stderr
    if "launch/train.py" in words:
        assert "saved checkpoint" in out and "fps=" in out, out[-2000:]
        if "--config" in words and words[words.index("--config") + 1] not in SHIPPED_TINY:
            # A shipped job at tiny size keeps what makes it that job (kind, frozen parts, template...).
            from test_journey_jobs import model_settings

            from blip2_megatron.config import load_job_config

            job = words[words.index("--config") + 1]
            ran = load_job_config(str(scratch / _output_dir(words) / "config.yaml"))
            assert model_settings(ran) == model_settings(load_job_config(job)), job
    elif "launch/predict.py" in words:
        # One "<image>\t<text>" line per image (a few-step model may well say nothing).
        images = [w for w in words if w.endswith(".jpg")]
        lines = [line for line in proc.stdout.splitlines() if "\t" in line]
        assert [line.split("\t")[0] for line in lines] == images and "ERROR" not in proc.stdout, proc.stdout
    elif "launch/chat.py" in words:
        # Piped in: one answer line per question (the /reset command answers nothing).
        assert len(proc.stdout.splitlines()) == 3 and "reset" in proc.stderr.lower(), out[-2000:]
    elif "launch/evaluate.py" in words:
        assert int(re.search(r'"num_evaluated": (\d+)', proc.stdout).group(1)) > 0, proc.stdout[-2000:]
    elif "launch/convert.py" in words or "data_tools/make_sample_dataset.py" in words:
        assert "wrote" in out or "sample dataset" in out.lower(), out[-2000:]
        if "reshard" in words:
            # The asked layout, and a checkpoint a resume accepts (its manifest); that it gives the
            # same loss and tokens, and resumes, is test_journey_reshard_export.py's.
            from blip2_megatron.convert.run_checkpoint import MANIFEST, find_checkpoint, read_trainer_state

            checkpoint = find_checkpoint(scratch / words[words.index("--out") + 1])
            layout = read_trainer_state(checkpoint)["layout"]
            target = (int(words[words.index("--tp") + 1]), int(words[words.index("--pp") + 1]))
            assert (layout["tp"], layout["pp"]) == target and (checkpoint / MANIFEST).is_file(), layout
    elif "launch/benchmark.py" in words:
        # Every figure written (by rank 0, once); a baseline's ratios beside ours, each side measured.
        assert proc.stdout.count("figures written to") == 1, proc.stdout[-2000:]
        out_json = scratch / re.search(r"figures written to (\S+)", proc.stdout).group(1)
        figures = json.loads(out_json.read_text())
        if "--generate" in words:  # both sides generate, measured, the same tokens
            for mode, result in figures["modes"].items():
                assert result["tokens"]["identical"], (mode, result["tokens"])
                for side in ("ours", "transformers"):
                    assert result[side]["tokens_per_s"] > 0 and result[side]["peak_mem_gb"] > 0, (
                        mode,
                        result,
                    )
            return
        assert figures["ours"]["fps"] > 0 and figures["ours"]["mfu"] is not None, figures
        if "--baseline" in words:
            assert figures["baseline"]["fps"] > 0 and figures["ratios"]["speed"] > 0, figures
        if "model.llm.pp=2" in words:
            assert (figures["tp"], figures["pp"]) == (2, 2), figures
        if "--profile" in words:  # where each side's step goes, and the op tables beside the figures
            for side in ("ours", "baseline"):
                assert 0 < figures["profile"][side]["dense_share"] < 1, figures["profile"]
            assert "aten::mm" in out_json.with_name("benchmark_profile.txt").read_text()
    elif "data_tools/download.py" in words:
        stats = json.loads(next((scratch / "laion").glob("*_stats.json")).read_text())
        assert (stats["successes"], stats["failed_to_download"]) == (6, 1)
