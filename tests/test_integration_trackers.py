"""report_to trackers beyond TensorBoard, for real: one Trainer run writes to MLflow (local SQLite store), W&B
(offline) and Trackio (local), and each store, read back, holds at every measured step exactly the numbers the
Trainer logged and (to float32) what TensorBoard got. A run without ``tensorboard`` importable still reaches the
trackers. The run happens in a fresh process (``tracker_run_script.py``), as a user's would."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from training import tensorboard_scalars

SCRIPT = Path(__file__).with_name("tracker_run_script.py")
TRACKERS = ["mlflow", "wandb", "trackio"]
HEADLINE = [
    "spectral/intruders_total",
    "spectral/effective_rank_mean",
    "spectral/intruder_energy_share",
    "spectral/intruder_sigma_ratio",
]


def run_script(out: Path, trackers: list[str], *flags: str) -> dict:
    """Train in a child process, in ``out`` with every store under it; the child's ``result.json``."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{out}/mlflow.db",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(out),
        "WANDB_SILENT": "true",
        **{f"WANDB_{d}_DIR": str(out / "wandb-home") for d in ("CACHE", "CONFIG", "DATA")},
        "TRACKIO_DIR": str(out / "trackio"),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), ",".join(trackers), str(out), *flags],
        env=env,
        cwd=out,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def mlflow_values(out: Path, tag: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, tag)}


def wandb_values(out: Path, tag: str) -> dict[int, float]:
    """From the offline run file: LevelDB-log framed protobuf records (W&B's own format, read with its protos)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = out.glob("wandb/offline-run-*/run-*.wandb")
    data, block, pos, chunk = path.read_bytes(), 32768, 7, b""  # 7 bytes: ":W&B", magic, version
    assert data[:4] == b":W&B"
    values = {}
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = chunk + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # a key with "/" is stored split, as nested_key
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
                if f"train/{tag}" in row:  # transformers' WandbCallback prefixes "train/"
                    values[row["train/global_step"]] = row[f"train/{tag}"]
    return values


def trackio_values(out: Path, tag: str) -> dict[int, float]:
    """From Trackio's SQLite project file (project "huggingface", the Trainer's default)."""
    with sqlite3.connect(out / "trackio" / "huggingface.db") as db:
        rows = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM metrics WHERE run_name = 'spectral'")]
    return {row["train/global_step"]: row[f"train/{tag}"] for row in rows if f"train/{tag}" in row}


READERS = {"mlflow": mlflow_values, "wandb": wandb_values, "trackio": trackio_values}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, dict]:
    installed = [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    if not installed:
        pytest.skip("none of mlflow, wandb, trackio is installed")
    out = tmp_path_factory.mktemp("trackers")
    return out, run_script(out, installed)


@pytest.mark.parametrize("tracker", TRACKERS)
def test_tracker_store_equals_log_history_and_tensorboard(tracked_run, tracker):
    pytest.importorskip(tracker, reason=f"{tracker} is not installed")
    out, result = tracked_run
    assert result["counts"] == result["reference_counts"] and result["totals"] == result["reference_totals"]
    history = {h["step"]: h for h in result["history"]}
    assert sorted(history) == [0, 2, 4] and history[4]["spectral/intruders_total"] > 0
    for tag in HEADLINE:
        stored, tensorboard = READERS[tracker](out, tag), dict(tensorboard_scalars(out / "tb", tag))
        assert sorted(stored) == sorted(tensorboard) == [0, 2, 4], tag
        for step, value in stored.items():
            assert value == history[step][tag], (tag, step)  # exactly what the Trainer logged
            assert float(np.float32(value)) == tensorboard[step], (tag, step)  # TensorBoard keeps float32


@pytest.mark.slow  # a second child process; the default suite keeps the run above
def test_trackers_only_without_tensorboard(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed")
    result = run_script(tmp_path, ["mlflow"], "--no-tensorboard")
    assert not list((tmp_path / "tb").glob("events*"))
    assert result["counts"] == result["reference_counts"]
    for tag in HEADLINE:
        assert mlflow_values(tmp_path, tag) == {h["step"]: h[tag] for h in result["history"]}
