"""The default job in a terminal shows a progress bar with an ETA; plot_run.py draws its log.

``python launch/train.py`` runs under a pseudo-terminal (the bar is on only when stderr is
a terminal), then ``python launch/plot_run.py <run dir>`` draws the run's ``log.jsonl``: the
PNG is read back and the steps plot_run reports drawing are checked against the log.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pytest
from journeys import LAUNCH, REPO, env, launch, step_records
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.journey]

MAX_STEPS = 10
# tqdm's bar: "training:  40%|████      | 4/10 [00:03<00:04, 1.52step/s, loss=5.1234]"
BAR = re.compile(r"training:\s+\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+) \[(\d+:\d\d)<(\d+:\d\d)[^\]\r\n]*\]")
# matplotlib's first colour (tab:blue), which draws the loss curve.
FIRST_CURVE_RGB = (0x1F, 0x77, 0xB4)


def run_in_terminal(command: list[str], silence_limit_s: float = 600) -> tuple[int, str]:
    """Run ``command`` with a pseudo-terminal as stdin, stdout and stderr; (exit code, everything it wrote)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    proc = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, env=env(), cwd=REPO)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], silence_limit_s)
            if not ready:
                proc.kill()
                raise AssertionError(f"no output for {silence_limit_s} s:\n{b''.join(chunks)[-3000:]!r}")
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal's last open end
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory, sample):
    """The default job for 10 steps in a terminal, logging every 2 steps, no final evaluation."""
    run = tmp_path_factory.mktemp("terminal") / "run"
    code, output = run_in_terminal(
        [
            sys.executable,
            str(LAUNCH / "train.py"),
            f"train.output_dir={run}",
            f"data.sample_root={sample.root}",
            f"train.max_steps={MAX_STEPS}",
            "train.log_interval=2",
            "eval.enabled=false",
            "data.num_workers=1",
        ]
    )
    assert code == 0, output[-4000:]
    return run, output


def test_training_in_a_terminal_shows_a_progress_bar_with_an_eta(terminal_run):
    _, output = terminal_run
    bars = [(int(done), int(total), eta) for done, total, _, eta in BAR.findall(output)]
    assert bars, f"no progress bar with an ETA on the terminal:\n{output[-3000:]}"
    assert {total for _, total, _ in bars} == {MAX_STEPS}
    done = [count for count, _, _ in bars]
    assert done == sorted(done) and done[-1] > done[0], done  # it advances
    assert "loss=" in output  # the latest logged loss rides along


def test_plot_run_draws_the_logged_steps_of_the_run(terminal_run):
    run, _ = terminal_run
    logged = sorted(step_records(run))
    assert logged == [1, 2, 4, 6, 8, 10]  # the first step, then every log_interval
    proc = launch("plot_run.py", str(run))
    png = run / "curves.png"
    assert proc.stdout.startswith(f"wrote {png}: {len(logged)} logged steps ({logged[0]}..{logged[-1]})")
    reported = dict(re.findall(r"^  (\w+): (\d+ points, steps \d+\.\.\d+)$", proc.stdout, flags=re.M))
    for key in ("loss", "lr", "fps", "step_time"):
        assert reported.get(key) == f"{len(logged)} points, steps {logged[0]}..{logged[-1]}", proc.stdout

    image = Image.open(png)
    assert image.format == "PNG"
    # 9 x 2.6 inches per panel at 100 dpi; four panels: loss, lr, FPS, step / data time.
    assert image.size == (900, 4 * 260), image.size
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels == FIRST_CURVE_RGB).all(axis=-1).sum() > 100  # the loss curve is drawn, not only axes
    assert Path(png).stat().st_size > 20_000
