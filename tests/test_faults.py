"""Faults injected into real jobs: a rank killed, a save killed, a full disk, damaged and crafted
checkpoints, non-finite losses. Each runs ``launch/train.py`` (under the DeepSpeed launcher
for multi-rank jobs) on the tiny default job and the built-in data.
"""

from __future__ import annotations

import json
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from journeys import DS_CONFIGS, REPO, env, step_records

from blip2_megatron.parallel.state import free_port

pytestmark = [pytest.mark.slow]

FAULTY = str(REPO / "tests" / "scripts" / "faulty_train.py")
TRAIN = str(REPO / "launch" / "train.py")
# train.collective_timeout_s of these jobs: the bound on every exit. A job that a lost rank
# ends through the timeout would take at least this long; the lost-rank path took 7-12 s on
# 2 loaded cores, which must stay well inside it.
TIMEOUT_S = 60


def _command(script: str, nproc: int, zero: int, run: Path, sample, *overrides: str) -> list[str]:
    args = [
        "--ds_config",
        str(DS_CONFIGS / f"zero{zero}.json"),
        f"train.output_dir={run}",
        f"data.sample_root={sample.root}",
        "train.log_interval=1",
        # Restarts here ask for another number of steps than the first run: within the warm-up
        # the learning rate does not depend on the run's length, so both runs' schedules agree.
        "train.warmup_steps=50",
        "data.num_workers=1",
        "eval.enabled=false",
        f"train.collective_timeout_s={TIMEOUT_S}",
        *overrides,
    ]
    if nproc:
        return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(free_port()), script, *args]
    return [sys.executable, script, *args]


def _run(command: list[str], fault: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    extra = {"BLIP2_FAULT": fault} if fault else {}
    return subprocess.run(
        command, env=env(**extra), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


# ------------------------------------------------------------------------------ a lost rank
def _rank_process(launcher: subprocess.Popen, local_rank: int) -> psutil.Process:
    deadline = time.time() + 120
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={local_rank}" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    raise AssertionError(f"no process of local rank {local_rank} appeared")


@pytest.mark.dist
@pytest.mark.parametrize(
    ("nproc", "zero", "layout"),
    [(2, 2, []), (2, 2, ["model.llm.tp=2"]), (4, 1, ["model.llm.pp=2"])],
    ids=["dp2", "tp2", "pp2-dp2"],
)
def test_a_killed_rank_ends_the_job_quickly_and_a_restart_resumes_exactly(
    sample, tmp_path, nproc, zero, layout
):
    run = tmp_path / "run"
    command = _command(TRAIN, nproc, zero, run, sample, "train.save_interval=4", *layout)
    launcher = subprocess.Popen(
        [*command, "train.max_steps=200"],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    victim = _rank_process(launcher, nproc - 1)
    deadline = time.time() + 300
    while max(step_records(run), default=0) < 10:
        assert launcher.poll() is None and time.time() < deadline, "the job ended before the fault"
        time.sleep(0.1)
    victim.send_signal(signal.SIGKILL)  # mid-step: the others are in a collective with it
    killed_at = time.monotonic()
    out, _ = launcher.communicate(timeout=4 * TIMEOUT_S)
    took = time.monotonic() - killed_at
    print(f"{nproc} ranks {layout}: every process gone {took:.1f} s after the kill")
    assert launcher.returncode != 0, out[-3000:]
    assert took < TIMEOUT_S, out[-3000:]
    # A survivor names it among the ranks it finds gone (one that logs later may also name a
    # pipeline peer that has stopped by then).
    lost = re.findall(r"lost rank\(s\) ((?:\d+ \(pid \d+\)(?:, )?)+)", out)
    assert any(f"{nproc - 1} (pid {victim.pid})" in names.split(", ") for names in lost), out[-4000:]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
    before = step_records(run)
    latest = (run / "checkpoints" / "latest").read_text()

    proc = _run([*command, "train.max_steps=14"])
    assert proc.returncode == 0, _output(proc)[-4000:]
    assert f"resumed from {run / 'checkpoints' / latest}" in _output(proc)
    after = step_records(run)
    resumed_from = int(latest.split("_")[1])
    overlap = [s for s in range(resumed_from + 1, 15) if s in before]
    assert overlap, (latest, sorted(before))
    for step in overlap:
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5, abs=1e-6), step


def test_a_killed_process_not_yet_collected_by_its_parent_counts_as_lost():
    """A SIGKILLed rank is a zombie until the launcher collects it; signal 0 still reaches it."""
    from blip2_megatron.training.faults import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(child.pid)
        child.send_signal(signal.SIGKILL)
        deadline = time.time() + 10
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.time() < deadline
            time.sleep(0.05)
        assert not _alive(child.pid)  # still a zombie: not collected yet
    finally:
        child.kill()
        child.wait()
    assert not _alive(child.pid)


# ------------------------------------------------------------------------------ saves
def test_a_process_killed_while_saving_leaves_the_last_checkpoint_intact(sample, tmp_path):
    from blip2_megatron.training.checkpoint import verify_checkpoint

    run = tmp_path / "run"
    command = _command(FAULTY, 0, 2, run, sample, "train.save_interval=3", "train.max_steps=9")
    proc = _run(command, fault="kill_in_save:2")
    assert proc.returncode == -signal.SIGKILL, _output(proc)[-3000:]
    checkpoints = run / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_00000003"
    assert (checkpoints / "step_00000006.partial").is_dir()  # what the crash left
    verify_checkpoint(checkpoints / "step_00000003")

    proc = _run(_command(TRAIN, 0, 2, run, sample, "train.save_interval=3", "train.max_steps=9"))
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert "removing" in _output(proc) and not list(checkpoints.glob("*.partial"))
    assert "resumed from" in _output(proc) and (checkpoints / "latest").read_text() == "step_00000009"


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB (root only): room for about one checkpoint of the tiny job."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_the_job_cleanly_and_keeps_the_last_checkpoint(sample, small_disk):
    from blip2_megatron.training.checkpoint import verify_checkpoint

    run = small_disk / "run"
    args = ["train.save_interval=2", "train.max_steps=8", "train.keep_last=3"]
    proc = _run(_command(TRAIN, 0, 2, run, sample, *args))
    out = _output(proc)
    assert proc.returncode == 4, out[-3000:]  # faults.EXIT_SAVE_FAILED
    assert "training stopped: no room for another checkpoint" in out and "MB free" in out
    checkpoints = run / "checkpoints"
    latest = (checkpoints / "latest").read_text()
    verify_checkpoint(checkpoints / latest)
    assert not list(checkpoints.glob("*.partial"))

    # With room again, the job resumes from that checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = _run(_command(TRAIN, 0, 2, run, sample, *args))
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert f"resumed from {checkpoints / latest}" in _output(proc)


def test_a_save_that_fails_midway_is_named_and_cleaned_up(sample, small_disk):
    """No earlier checkpoint to size the next one by: the write itself fails, with its cause."""
    run = small_disk / "run"
    (small_disk / "ballast").write_bytes(b"\0" * (9 << 20))  # leave ~3 MB: less than one checkpoint
    proc = _run(_command(TRAIN, 0, 2, run, sample, "train.max_steps=3"))
    out = _output(proc)
    assert proc.returncode == 4, out[-3000:]
    assert "No space left on device" in out and "step_00000003" in out
    assert not (run / "checkpoints" / "latest").exists()
    (small_disk / "ballast").unlink()
    proc = _run(_command(TRAIN, 0, 2, run, sample, "train.max_steps=3"))
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert not list((run / "checkpoints").glob("*.partial"))


# ------------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture
def three_checkpoints(sample, tmp_path):
    run = tmp_path / "run"
    proc = _run(
        _command(TRAIN, 0, 2, run, sample, "train.save_interval=2", "train.max_steps=6", "train.keep_last=3")
    )
    assert proc.returncode == 0, _output(proc)[-3000:]
    return run


def test_resume_auto_falls_back_from_a_truncated_checkpoint(three_checkpoints, sample):
    run = three_checkpoints
    before = step_records(run)
    damaged = run / "checkpoints" / "step_00000006" / "weights" / "pp00-tp00.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    proc = _run(_command(TRAIN, 0, 2, run, sample, "train.save_interval=2", "train.max_steps=8"))
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert f"{damaged} has" in out and "truncated" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}" in out
    after = step_records(run)
    for step in (5, 6):
        assert after[step]["loss"] == pytest.approx(before[step]["loss"], rel=1e-5, abs=1e-6)


def test_an_explicit_damaged_checkpoint_is_an_error_naming_the_file(three_checkpoints, sample, tmp_path):
    run = three_checkpoints
    target = run / "checkpoints" / "step_00000004"
    flipped = next(target.glob("*_states.pt"))  # DeepSpeed's model (and optimizer) states
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    proc = _run(
        _command(TRAIN, 0, 2, tmp_path / "other", sample, f"train.resume={target}", "train.max_steps=8")
    )
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert f"{flipped} differs from what was written" in proc.stderr


class _Payload:
    """What a crafted checkpoint would run on load: here it only leaves a mark."""

    def __init__(self, mark: str):
        self.mark = mark

    def __reduce__(self):
        return (Path.touch, (Path(self.mark),))


def test_a_crafted_pickle_in_a_checkpoint_is_refused_unrun(three_checkpoints, sample, tmp_path):
    from blip2_megatron.training.checkpoint import write_manifest

    run = three_checkpoints
    target = run / "checkpoints" / "step_00000006"
    mark = tmp_path / "payload-ran"
    (target / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps({"module": _Payload(str(mark))}))
    write_manifest(target)  # whoever crafted the file can rewrite the manifest too
    proc = _run(_command(TRAIN, 0, 2, run, sample, f"train.resume={target}", "train.max_steps=8"))
    assert proc.returncode == 2, _output(proc)[-3000:]
    assert "refused" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert not mark.exists(), "the crafted pickle ran"
    # Evaluation, prediction and export read only the safetensors weights: still fine.
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "evaluate.py"),
            "--checkpoint",
            str(target),
            "eval.max_samples=4",
            "eval.num_beams=1",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, _output(proc)[-3000:]
    assert not mark.exists()


# ------------------------------------------------------------------------------ non-finite losses
@pytest.mark.dist
def test_non_finite_steps_are_skipped_everywhere_and_counted(sample, tmp_path):
    """NaN on one of two DP ranks at steps 3-4: both ranks skip; training goes on from the same weights."""
    run = tmp_path / "run"
    proc = _run(_command(FAULTY, 2, 2, run, sample, "train.max_steps=8"), fault="nan_loss:3-4:1")
    out = _output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "step 3: non-finite loss, step skipped (1 in a row, 1 in total" in out
    records = step_records(run)
    assert sorted(records) == [1, 2, 5, 6, 7, 8]  # skipped steps log no loss
    assert records[8]["skipped_steps"] == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and all(r["loss"] == r["loss"] for r in records.values())


def test_too_many_non_finite_steps_stop_with_the_last_good_state_saved(sample, tmp_path):
    from blip2_megatron.convert.run_checkpoint import RunWeights

    run = tmp_path / "run"
    overrides = ["train.max_steps=20", "train.save_interval=2", "train.max_bad_steps=3", "train.keep_last=5"]
    proc = _run(_command(FAULTY, 0, 2, run, sample, *overrides), fault="nan_loss:3-inf")
    out = _output(proc)
    assert proc.returncode == 5, out[-3000:]  # faults.EXIT_NON_FINITE
    assert "3 non-finite steps in a row (train.max_bad_steps=3)" in out
    good, stopped = RunWeights(run / "checkpoints" / "step_00000002" / "weights"), None
    stopped = RunWeights(run / "checkpoints" / "step_00000005" / "weights")
    for name in good.keys():
        assert good.read(name).equal(stopped.read(name)), name
