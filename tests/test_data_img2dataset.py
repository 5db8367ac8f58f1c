"""A real img2dataset run (through data_tools/download.py) against a local HTTP server.

The server hands out good JPEGs, a PNG with alpha, a CMYK JPEG and a truncated JPEG, and
answers 404 for one url. img2dataset's own stats count the 404 (failed_to_download) and
the truncated JPEG (failed_to_resize: "Image decoding error"), so no defect reaches its
shards; a second, hand-made shard holding a truncated JPEG and a sample without caption
checks our loader's own counting. The img2dataset run takes ~17 s here, hence ``slow``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
from data_helpers import TOOLS_DIR, encode, jpeg_bytes, load_tool, sample_members, truncated_jpeg, write_tar
from PIL import Image

from blip2_megatron.data import DataConfig, build_train_loader
from blip2_megatron.data.wds import read_stats_files

CAPTIONS = {
    "good0.jpg": "A small photo.",
    "good1.jpg": "Another (small) photo!",
    "alpha.png": "a transparent png",
    "cmyk.jpg": "a cmyk jpeg",
    "truncated.jpg": "half a jpeg",
    "missing.jpg": "this one is not there",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def image_server(tmp_path):
    """``python -m http.server`` on a free local port serving the test images; yields the base url."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "good0.jpg").write_bytes(jpeg_bytes(80, 60, seed=0))
    (site / "good1.jpg").write_bytes(jpeg_bytes(60, 80, seed=1))
    rgba = Image.new("RGBA", (50, 40), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (10, 10, 30, 30))
    (site / "alpha.png").write_bytes(encode(rgba, "PNG"))
    (site / "cmyk.jpg").write_bytes(encode(Image.new("CMYK", (48, 48), (0, 255, 255, 0)), "JPEG"))
    (site / "truncated.jpg").write_bytes(truncated_jpeg(80, 60))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("http.server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_img2dataset_shards_feed_the_loader(image_server, tmp_path, capsys):
    url_list = tmp_path / "urls.json"  # MiniGPT-4's layout: a JSON list of {"url", "caption"}
    url_list.write_text(
        json.dumps([{"url": f"{image_server}/{name}", "caption": c} for name, c in CAPTIONS.items()])
    )
    output = tmp_path / "shards"
    result = subprocess.run(
        [
            sys.executable,
            str(TOOLS_DIR / "download.py"),
            "--url-list",
            str(url_list),
            "--output",
            str(output),
            "--image-size",
            "32",
            "--processes",
            "1",
            "--threads",
            "4",
            "--retries",
            "0",
            "--timeout",
            "5",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={
            **os.environ,
            "NO_ALBUMENTATIONS_UPDATE": "1",
        },  # img2dataset imports it; no update check offline
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "successes: 4" in result.stdout and "failed_to_download: 1" in result.stdout

    totals = read_stats_files(output)
    assert (totals["count"], totals["successes"]) == (6, 4)
    assert (totals["failed_to_download"], totals["failed_to_resize"]) == (1, 1)
    statuses = pd.read_parquet(output / "00000.parquet").set_index("url")["status"]
    assert statuses[f"{image_server}/missing.jpg"] == "failed_to_download"
    assert statuses[f"{image_server}/truncated.jpg"] == "failed_to_resize"

    # Our hand-made shard with defects img2dataset would not have let through.
    members = sample_members("h0", truncated_jpeg(), "truncated in the shard")
    members += sample_members("h1", jpeg_bytes(40, 40), None)  # no caption
    members += sample_members("h2", jpeg_bytes(40, 40, seed=2), "a good hand made one", {"key": "h2"})
    write_tar(output / "00001.tar", members)

    cfg = DataConfig(
        kind="wds",
        train_shards=[str(output / "{00000..00001}.tar")],
        image_size=32,
        batch_size=5,
        num_workers=0,
        shuffle_buffer=0,  # in shard order, all 8 samples are read to find the 5 good ones
        samples_per_epoch=5,
    )
    loader = build_train_loader(cfg, dp_rank=0, dp_size=1, seed=0)
    (batch,) = list(loader)
    assert batch["image"].shape == (5, 3, 32, 32)
    assert sorted(batch["text_input"]) == sorted(
        [
            "a small photo",
            "another small photo",
            "a transparent png",
            "a cmyk jpeg",
            "a good hand made one",
        ]
    )
    assert loader.stats == {"truncated_image": 1, "missing_caption": 1}

    check = load_tool("check_shards")
    assert check.main([str(output / "{00000..00001}.tar")]) == 0
    report = capsys.readouterr().out
    assert "truncated_image" in report and "missing_caption" in report
    assert check.main([str(output / "{00000..00002}.tar")]) == 1  # 00002.tar does not exist
    assert "shard not found" in capsys.readouterr().out
