"""A real ``tensorboard`` server shows the spectral scalars while training is still running.

Training runs in a thread and is held (by a gate callback) after step 2 until the test has seen the values
through TensorBoard's HTTP API, so "before training has finished" is guaranteed, not a race; every wait is
bounded and the server is terminated in ``finally``.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model
from transformers import TrainerCallback

from lora_spectral_callback.callback import LoRASpectralCallback
from tests.helpers import RandomTokens, tiny_bert
from tests.training import make_trainer

pytestmark = pytest.mark.slow

HOLD_AT_STEP = 2
TAG = "spectral/intruders_total"


class Gate(TrainerCallback):
    """Blocks the training loop at one step until released (at most ``timeout`` seconds)."""

    def __init__(self, step: int, timeout: float = 120.0) -> None:
        self.step, self.timeout = step, timeout
        self.reached, self.released = threading.Event(), threading.Event()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.reached.set()
            self.released.wait(self.timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def wait_for(predicate, timeout: float, what: str):
    """Poll ``predicate`` (which may raise while the server warms up) until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as err:  # connection refused while starting, 4xx before the run exists
            last_error = err
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


def test_spectral_scalars_appear_in_live_tensorboard_before_training_ends(tmp_path):
    logdir = tmp_path / "runs"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    tensorboard = Path(sys.executable).with_name("tensorboard")
    log = open(tmp_path / "tensorboard.log", "w")  # noqa: SIM115 - the server writes to it until the test ends
    server = subprocess.Popen(
        [
            str(tensorboard),
            "--logdir",
            str(logdir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--reload_interval",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    worker = None
    gate = Gate(HOLD_AT_STEP)
    try:
        wait_for(lambda: get_json(f"{base}/data/runs") is not None, 90, "tensorboard to start")

        model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
        callback = LoRASpectralCallback(every_n_steps=1, log_dir=str(logdir / "spectral"), progress=False)
        trainer = make_trainer(
            tmp_path / "out", model, [callback, gate], 5, data=RandomTokens(n=64), learning_rate=5e-2, seed=42
        )
        args = trainer.args
        worker = threading.Thread(target=trainer.train, daemon=True)
        worker.start()
        assert gate.reached.wait(120), "training did not reach the gate"

        tags = wait_for(
            lambda: get_json(f"{base}/data/plugin/scalars/tags").get("spectral"), 60, "spectral scalar tags"
        )
        assert TAG in tags and "spectral/effective_rank_mean" in tags
        assert "spectral/intruders/bert.encoder.layer.0.attention.self.query" in tags
        query = urllib.parse.urlencode({"run": "spectral", "tag": TAG})
        points = wait_for(
            lambda: (p := get_json(f"{base}/data/plugin/scalars/scalars?{query}")) and len(p) >= HOLD_AT_STEP + 1 and p,
            60,
            "three measurements of intruders_total",
        )
        assert worker.is_alive() and trainer.state.global_step == HOLD_AT_STEP < args.max_steps  # still training
        logged = {e["step"]: e[TAG] for e in trainer.state.log_history if TAG in e}
        assert {int(step): value for _, step, value in points} == logged  # the values TensorBoard serves
        assert sorted(logged) == [0, 1, 2]
    finally:
        gate.released.set()
        if worker is not None:
            worker.join(120)
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert not worker.is_alive() and trainer.state.global_step == args.max_steps
