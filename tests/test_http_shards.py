"""Training from shards on a server: an http URL list and a ``pipe:curl`` command on 127.0.0.1.

Clusters read shards over HTTP or object storage (webdataset's ``http://`` and ``pipe:``
urls). A local ``http.server`` serves the built-in dataset's shard folder; the default job
trains from it through ``launch/train.py``, counts its samples from img2dataset's
``_stats.json`` read over the same address, names a missing remote shard by its URL, and
resumes at the same data position as an uninterrupted run.
"""

from __future__ import annotations

import functools
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from journeys import launch, step_records, summary

from blip2_megatron.data.wds import count_samples, expand_shard_patterns, iter_shard_samples, stats_path_for

CURL = "pipe:curl -s -f"


class ShardServer:
    """A loopback HTTP server over one folder that records the paths asked for (absent files: 404)."""

    def __init__(self, folder: Path):
        self.requested: list[str] = []
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                server.requested.append(self.path)
                super().do_GET()

            def log_message(self, *args):  # quiet: the test reads `requested` instead
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server(sample):
    served = ShardServer(Path(sample.root))
    yield served
    served.close()


def _shard_names(sample) -> str:
    """The built-in training shards' brace pattern, relative to the dataset root ("train/{00000..00007}.tar")."""
    return str(Path(sample.train_shards).relative_to(sample.root))


def test_stats_address_follows_the_shard_address():
    assert stats_path_for("/d/00012.tar") == "/d/00012_stats.json"
    assert stats_path_for("http://h/d/00012.tar") == "http://h/d/00012_stats.json"
    assert stats_path_for("https://h/d/00012.tar?sig=x") == "https://h/d/00012_stats.json?sig=x"
    assert (
        stats_path_for("pipe:curl -s -f http://h/d/00012.tar")
        == "pipe:curl -s -f http://h/d/00012_stats.json"
    )
    assert (
        stats_path_for("pipe:aws s3 cp s3://b/x.tar/00012.tar -")
        == "pipe:aws s3 cp s3://b/x.tar/00012_stats.json -"
    )


def test_remote_counts_come_from_the_served_stats_files(server, sample):
    names = _shard_names(sample)
    for pattern in (f"{server.base}/{names}", f"{CURL} {server.base}/{names}"):
        server.requested.clear()
        assert count_samples(expand_shard_patterns(pattern)) == sample.num_train
        assert sorted(server.requested) == [
            f"/train/{index:05d}_stats.json" for index in range(len(expand_shard_patterns(pattern)))
        ]


@pytest.mark.parametrize("form", ["http", "pipe"])
def test_a_missing_remote_shard_is_named_by_its_url(server, form):
    url = f"{server.base}/train/99999.tar"
    url = url if form == "http" else f"{CURL} {url}"
    with pytest.raises(FileNotFoundError, match=f"shard not found: {url}"):
        list(iter_shard_samples(url, on_error=lambda err: pytest.fail(f"a missing shard was skipped: {err}")))
    with pytest.raises(ValueError, match="99999_stats.json could not be read") as raised:
        count_samples([url])
    assert url in str(raised.value)


def _train(run: Path, sample, shards: str, *extra: str, check: bool = True):
    return launch(
        "train.py",
        f"train.output_dir={run}",
        "data.kind=wds",
        f"data.train_shards={json.dumps([shards])}",
        "data.train_augment=false",  # as the default job on the built-in data (its captions name positions)
        "data.num_workers=1",
        "train.max_steps=6",
        "train.warmup_steps=2",
        "train.log_interval=1",
        "train.save_interval=3",
        "eval.enabled=false",
        *extra,
        check=check,
    )


def _loader_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())["loader"]


@pytest.mark.slow
@pytest.mark.journey
def test_train_from_a_server_then_resume_through_a_pipe_at_the_same_data_position(tmp_path, server, sample):
    names = _shard_names(sample)
    server.requested.clear()
    straight = tmp_path / "http"
    _train(straight, sample, f"{server.base}/{names}")
    reference = {step: record["loss"] for step, record in step_records(straight).items()}
    assert sorted(reference) == list(range(1, 7))
    # Counted from the stats files over HTTP and read over HTTP.
    assert any(path.endswith("_stats.json") for path in server.requested)
    assert any(path.endswith(".tar") for path in server.requested)
    at_save = _loader_state(straight / "checkpoints" / "step_00000003")
    assert at_save["position"] == 3 and at_save["epoch"] == 0
    assert at_save["batches_per_epoch"] == sample.num_train // 16  # the default job's batch of 16

    # The same shards through a `pipe:curl` command, resumed from the HTTP run's step-3 checkpoint.
    server.requested.clear()
    resumed = tmp_path / "pipe"
    _train(
        resumed,
        sample,
        f"{CURL} {server.base}/{names}",
        f"train.resume={straight / 'checkpoints' / 'step_00000003'}",
    )
    assert any(path.endswith(".tar") for path in server.requested)
    continued = {step: record["loss"] for step, record in step_records(resumed).items()}
    assert sorted(continued) == [4, 5, 6]
    for step in (4, 5, 6):  # the same batches as the uninterrupted run: the same losses
        assert continued[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    final_straight = _loader_state(straight / "checkpoints" / "step_00000006")
    final_resumed = _loader_state(resumed / "checkpoints" / "step_00000006")
    assert final_resumed["position"] == final_straight["position"] == 6
    assert final_resumed["epoch"] == final_straight["epoch"]
    # Whole shards read through curl and through the pipe: nothing taken for corrupt or cut short.
    assert summary(straight)["data_skipped"] == summary(resumed)["data_skipped"] == {}


@pytest.mark.slow
@pytest.mark.journey
def test_training_names_a_missing_remote_shard(tmp_path, server, sample):
    last = len(expand_shard_patterns(sample.train_shards))  # one past the last shard served
    proc = _train(tmp_path / "run", sample, f"{server.base}/train/{{00000..{last:05d}}}.tar", check=False)
    assert proc.returncode != 0
    assert f"{server.base}/train/{last:05d}.tar" in proc.stderr
    assert not step_records(tmp_path / "run")
