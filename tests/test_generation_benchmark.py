"""``launch/benchmark.py --generate``: ours against transformers' generate, end to end at tiny size.

The command builds the tiny job's model, exports it for transformers, and times both sides'
greedy and beam-search generation in alternating rounds; both must print their figures and
generate the same tokens. No timing is asserted (a shared machine's speed varies).
"""

from __future__ import annotations

import json

from journeys import launch

from blip2_megatron.training.generation_benchmark import compare_tokens


def test_compare_tokens_counts_differences_where_both_sides_generated():
    same = compare_tokens([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
    assert same["identical"] and same["compared"] == 5 and same["differing"] == 0
    shorter = compare_tokens([[1, 2, 3], [4, 5]], [[1, 2], [4, 6]])
    assert not shorter["identical"] and shorter["compared"] == 4 and shorter["differing"] == 1


def test_generate_mode_times_both_sides_with_identical_tokens(tmp_path):
    out = tmp_path / "generation.json"
    proc = launch(
        "benchmark.py",
        "--generate",
        "--config",
        "tiny_stage2",
        "--rounds",
        "2",
        "--beams",
        "1",
        "3",
        "--new-tokens",
        "6",
        "--out",
        str(out),
        f"train.output_dir={tmp_path}",
        "data.batch_size=4",
    )
    printed = proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert figures["rounds"] == 2 and figures["new_tokens"] == 6 and figures["batch"] == 4
    assert set(figures["modes"]) == {"greedy", "beam 3"}
    for mode, result in figures["modes"].items():
        assert f"generation, {mode} (4 images, 6 new tokens each" in printed, printed[-3000:]
        tokens = result["tokens"]
        assert tokens["identical"] and tokens["identical_every_round"], (mode, tokens)
        assert tokens["rows"] == 4 and tokens["compared"] == 4 * 6 and tokens["lengths"] == [6]
        for side in ("ours", "transformers"):
            assert result[side]["tokens_per_s"] > 0 and result[side]["images_per_s"] > 0
            assert result[side]["peak_mem_gb"] > 0
            assert len(result["by_round"][side]) == 2
        assert result["ratios"]["rounds"] == 2
    assert printed.count("tokens: identical (4 rows, 24 positions compared)") == 2, printed[-3000:]
    assert "| tokens/s" in printed and "| peak memory (GB)" in printed
