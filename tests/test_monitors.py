"""Tracking: TensorBoard, W&B (offline) and CSV hold every logged number; read back from their files."""

from __future__ import annotations

import csv
import json
import struct

import pytest
from journeys import DS_CONFIGS, launch, step_records

pytestmark = [pytest.mark.slow, pytest.mark.journey]

TRAINING_KEYS = {"loss", "lr", "fps", "fps_per_device", "tflops_per_device", "peak_mem_gb", "step_time"}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, sample):
    """The default job for 20 steps with all three monitors and a validation every 10 steps."""
    root = tmp_path_factory.mktemp("tracked")
    run = root / "run"
    ds_config = json.loads((DS_CONFIGS / "zero2.json").read_text())
    # The TensorBoard monitor switched on the DeepSpeed way: its section in the ds_config.
    ds_config["tensorboard"] = {"enabled": True, "output_path": str(root / "tb"), "job_name": "tiny"}
    (root / "ds.json").write_text(json.dumps(ds_config))
    launch(
        "train.py",
        "--ds_config",
        str(root / "ds.json"),
        f"train.output_dir={run}",
        f"data.sample_root={sample.root}",
        "train.max_steps=20",
        "train.log_interval=5",
        "train.monitors=[wandb, csv]",
        "eval.interval=10",
        "eval.task=vqa",
        "eval.max_samples=8",
        "eval.num_beams=1",
        "eval.enabled=false",
        "data.num_workers=1",
    )
    return root, run


def test_tensorboard_from_the_deepspeed_section_holds_losses_and_eval_metrics(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, run = tracked_run
    events = EventAccumulator(str(root / "tb" / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{key}" for key in TRAINING_KEYS} <= tags, tags
    assert {"eval/overall", "eval/yes/no", "eval/agg_metric"} <= tags, tags
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    logged = step_records(run)
    assert sorted(losses) == [1, 5, 10, 15, 20]
    for step, value in losses.items():
        assert value == pytest.approx(logged[step]["loss"], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/overall")] == [10]


def _wandb_records(path):
    """The protobuf records of an offline ``.wandb`` file: a ":W&B" header, then LevelDB-log blocks."""
    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 1:  # a whole record
            yield payload
        elif kind in (2, 3):  # the first / a middle piece of a record
            pending = payload if kind == 2 else pending + payload
        elif kind == 4:  # the last piece
            yield pending + payload


def test_wandb_offline_run_holds_the_history(tracked_run):
    from wandb.proto import wandb_internal_pb2

    _, run = tracked_run
    (offline,) = (run / "wandb" / "wandb").glob("offline-run-*")
    history = []
    for data in _wandb_records(next(offline.glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    losses = {row["_step"]: row["train/loss"] for row in history if "train/loss" in row}
    logged = step_records(run)
    assert sorted(losses) == [1, 5, 10, 15, 20]
    assert all(losses[s] == pytest.approx(logged[s]["loss"], rel=1e-6) for s in losses)
    assert any("eval/overall" in row for row in history)


def test_csv_files_hold_one_series_per_metric(tracked_run):
    _, run = tracked_run
    folder = run / "csv"
    with (folder / "train_loss.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [1, 5, 10, 15, 20]
    for key in TRAINING_KEYS:
        assert (folder / f"train_{key}.csv").is_file(), key
    assert (folder / "eval_overall.csv").read_text().splitlines()[1].startswith("10,")


def test_a_missing_package_is_an_error_naming_the_install(tmp_path, sample, monkeypatch):
    from blip2_megatron.config import ConfigError, load_job_config
    from blip2_megatron.training import monitors

    job = load_job_config(None, ["train.monitors=[tensorboard]", f"train.output_dir={tmp_path}"])
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[tracking\]"'):
        monitors.Monitors(job, {}, tmp_path, enabled=True)
    with pytest.raises(ConfigError, match=r"train\.monitors\[0\]"):
        load_job_config(None, ["train.monitors=[mlflow]"])
