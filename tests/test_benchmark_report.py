"""The benchmark's ratios are reported as the median and range over rounds, as quoted.

On a shared machine one round's speed ratio can land anywhere in a wide band (the tiny
job measured 0.91x, 1.28x and 0.69x in three rounds of one run), so ``launch/benchmark.py``
pairs each round's two sides and reports the median and range of those ratios.
"""

from __future__ import annotations

import json
import statistics

import pytest
from journeys import DS_CONFIGS, launch

from blip2_megatron.training.benchmark import format_round_ratios, round_ratios


def _runs(fps: list[float], memory: list[float | None]) -> list[dict]:
    return [{"fps": f, "peak_mem_gb": m} for f, m in zip(fps, memory)]


def test_ratios_are_the_median_and_range_of_the_rounds():
    baseline = _runs([100.0, 100.0, 100.0], [2.0, 2.0, 2.0])
    ours = _runs([91.0, 128.0, 69.0], [1.8, 2.2, 1.6])
    ratios = round_ratios(ours, baseline)
    assert ratios["rounds"] == 3
    assert ratios["speed_by_round"] == pytest.approx([0.91, 1.28, 0.69])
    assert ratios["speed"] == pytest.approx(0.91) and ratios["speed_range"] == pytest.approx([0.69, 1.28])
    assert ratios["memory_by_round"] == pytest.approx([0.9, 1.1, 0.8])
    assert ratios["memory"] == pytest.approx(0.9) and ratios["memory_range"] == pytest.approx([0.8, 1.1])
    text = format_round_ratios({**ratios, "speed_fastest": 1.28})
    assert (
        "speed ratio: median 0.91x, range 0.69x-1.28x over 3 rounds (by round: 0.91x, 1.28x, 0.69x)" in text
    )
    assert "memory ratio: median 0.90x, range 0.80x-1.10x over 3 rounds" in text
    assert "fastest round (1.28x)" in text


def test_an_even_number_of_rounds_takes_the_middle_two():
    ratios = round_ratios(_runs([85.0, 123.0], [1.0, 1.0]), _runs([100.0, 100.0], [1.0, 1.0]))
    assert ratios["speed"] == pytest.approx(1.04) and ratios["speed_range"] == pytest.approx([0.85, 1.23])


def test_memory_not_measured_is_reported_as_such():
    """Replicated on CPU: both sides share one process's resident memory, so no ratio."""
    ratios = round_ratios(_runs([2.0, 3.0], [None, None]), _runs([1.0, 1.0], [None, None]))
    assert ratios["memory"] is None and ratios["memory_range"] is None and ratios["memory_by_round"] is None
    assert "memory ratio: not measured" in format_round_ratios(ratios)


def test_one_round_says_how_to_get_a_range():
    ratios = round_ratios(_runs([110.0], [1.0]), _runs([100.0], [1.0]))
    assert ratios["speed_range"] == pytest.approx([1.1, 1.1])
    assert "1.10x (1 round; --rounds N gives a median and range)" in format_round_ratios(ratios)


@pytest.mark.slow
def test_benchmark_command_reports_median_and_range_over_rounds(tmp_path):
    out = tmp_path / "benchmark.json"
    proc = launch(
        "benchmark.py",
        "--ds_config",
        str(DS_CONFIGS / "zero2.json"),
        "--config",
        "tiny_stage2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--baseline",
        "hf",
        "--rounds",
        "3",
        "--out",
        str(out),
        f"train.output_dir={tmp_path}",
    )
    figures = json.loads(out.read_text())
    ratios = figures["ratios"]
    ours, baseline = figures["ours"]["fps_by_round"], figures["baseline"]["fps_by_round"]
    assert figures["rounds"] == ratios["rounds"] == len(ours) == len(baseline) == 3
    assert ratios["speed_by_round"] == pytest.approx([o / b for o, b in zip(ours, baseline)])
    assert ratios["speed"] == pytest.approx(statistics.median(ratios["speed_by_round"]))
    assert ratios["speed_range"] == pytest.approx(
        [min(ratios["speed_by_round"]), max(ratios["speed_by_round"])]
    )
    assert ratios["speed_fastest"] == pytest.approx(max(ours) / max(baseline))
    assert len(ratios["memory_by_round"]) == 3
    assert ratios["memory"] == pytest.approx(statistics.median(ratios["memory_by_round"]))
    # The printed summary quotes the same median and range.
    low, high = ratios["speed_range"]
    expected = f"speed ratio: median {ratios['speed']:.2f}x, range {low:.2f}x-{high:.2f}x over 3 rounds"
    assert expected in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
