"""Fault injection inside real Trainer runs: every fault of issue 6 (2) leaves training running to its last step,
is logged once with where it happened, and is counted by ``spectral/errors``; ``strict=True`` re-raises it."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import torch
from tensorboard.summary.writer.record_writer import RecordWriter
from training import At, lora_bert, make_trainer, tensorboard_scalars
from transformers import TrainerCallback

from lora_spectral_callback import LoRASpectralCallback

LAYER = "bert.encoder.layer.0.attention.self.query"  # readable name of the layer faults are injected into
MAX_STEPS = 6
MEASURED = [0, 2, 4, 6]


def lora_module(model, name: str = LAYER):
    return model.get_submodule("base_model.model." + name)


def run(tmp_path, fault, caplog, max_steps: int = MAX_STEPS, **options):
    """Train with the fault (a callback, or ``fn(model, step)`` run at each step end) placed before the spectral
    callback; returns (trainer, callback)."""
    callback = LoRASpectralCallback(every_n_steps=2, log_dir=str(tmp_path / "tb"), progress=False, **options)
    fault = fault if isinstance(fault, TrainerCallback) else At(fault)
    trainer = make_trainer(tmp_path / "out", lora_bert(), [fault, callback], max_steps=max_steps)
    with caplog.at_level(logging.WARNING, logger="lora_spectral_callback"):
        trainer.train()
    return trainer, callback


def errors_in_history(trainer) -> dict[int, float]:
    return {
        e["step"]: e.get("spectral/errors", 0) for e in trainer.state.log_history if "spectral/intruders_total" in e
    }


def warnings_about(caplog, *words: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and all(w in r.getMessage() for w in words)
    ]


# -- NaN / Inf weights -------------------------------------------------------------------------------------------
def poison(model, step):
    if step == 2:
        with torch.no_grad():
            lora_module(model).lora_B["default"].weight[0, 0] = float("nan")


def test_nonfinite_weights_are_reported_and_training_continues(tmp_path, caplog):
    alerts = []
    trainer, callback = run(tmp_path, poison, caplog, on_alert=alerts.append)
    assert trainer.state.global_step == MAX_STEPS
    report = callback.last_report
    assert LAYER in report.nonfinite_layers and LAYER not in report.layers
    assert "NaN or Inf" in report.errors[LAYER]
    assert len(warnings_about(caplog, LAYER, "LoRA factors contain NaN or Inf")) == 1
    history = errors_in_history(trainer)
    assert history[0] == 0 and all(history[s] >= 1 for s in (2, 4, 6))
    assert [s for s, v in tensorboard_scalars(tmp_path / "tb", "spectral/errors") if v >= 1] == [2, 4, 6]
    assert callback.last_alert.nonfinite and [r.step for r in alerts] == [2, 4, 6]  # a real failure: alerts


def test_nonfinite_weights_stop_training_when_asked(tmp_path, caplog):
    trainer, callback = run(tmp_path, poison, caplog, stop_on_nonfinite=True)
    assert trainer.state.global_step == 2 and callback.last_alert.nonfinite
    assert (tmp_path / "out" / "checkpoint-2").is_dir()


def test_nonfinite_is_a_finding_not_a_monitoring_fault_so_strict_does_not_raise(tmp_path, caplog):
    trainer, callback = run(tmp_path, poison, caplog, strict=True)
    assert trainer.state.global_step == MAX_STEPS and LAYER in callback.last_report.nonfinite_layers


def test_nonfinite_pretrained_weight_is_reported_not_raised():
    from lora_spectral_callback import SpectralMonitor

    model = lora_bert()
    with torch.no_grad():
        lora_module(model).get_base_layer().weight[3, 1] = float("inf")
    report = SpectralMonitor(model, progress=False, strict=True).measure(0)
    assert report.nonfinite_layers == [LAYER] and report.errors == {LAYER: "pretrained weight contains NaN or Inf"}
    assert len(report.layers) == 3


# -- a layer that disappears or changes shape --------------------------------------------------------------------
def remove_layer(model, step):
    if step == 2:  # e.g. a user's unload/replace of one adapter layer mid-run
        parent = model.get_submodule("base_model.model." + LAYER.rsplit(".", 1)[0])
        parent.query = lora_module(model).get_base_layer()


def test_layer_that_disappears(tmp_path, caplog):
    trainer, callback = run(tmp_path, remove_layer, caplog)
    assert trainer.state.global_step == MAX_STEPS
    assert "no longer part of the model" in callback.last_report.errors[LAYER]
    assert len(warnings_about(caplog, LAYER, "no longer part of the model")) == 1
    assert errors_in_history(trainer) == {0: 0, 2: 1, 4: 1, 6: 1}
    assert tensorboard_scalars(tmp_path / "tb", "spectral/errors") == [(0, 0), (2, 1), (4, 1), (6, 1)]
    assert len(callback.last_report.layers) == 3  # the other layers are still measured


class ShapeChange(TrainerCallback):
    """Gives the base weight another shape for the measurement at step 2 only (restored before step 3 runs), so
    the run itself is unaffected while the monitor sees a changed layer."""

    saved = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            base = lora_module(model).get_base_layer()
            self.saved, base.weight = base.weight, torch.nn.Parameter(torch.zeros(16, 32), requires_grad=False)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.saved is not None:
            lora_module(model).get_base_layer().weight, self.saved = self.saved, None


def test_layer_that_changes_shape(tmp_path, caplog):
    trainer, callback = run(tmp_path, ShapeChange(), caplog)
    assert trainer.state.global_step == MAX_STEPS
    assert len(warnings_about(caplog, LAYER, "weight shape (16, 32) no longer matches the snapshot (32, 32)")) == 1
    assert errors_in_history(trainer) == {0: 0, 2: 1, 4: 0, 6: 0}  # measured again once the shape is back
    assert LAYER in callback.last_report.layers


# -- out of memory during the SVD ----------------------------------------------------------------------------------
OOM_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),  # older torch / other backends
]


def out_of_memory(monkeypatch, error):
    """From step 2 on, every SVD (exact path, and the Rayleigh-Ritz step of the iterative path) runs out of
    memory; the pretrained snapshot at train begin has already succeeded."""

    def svd(*args, **kwargs):
        raise error

    return lambda model, step: step == 2 and monkeypatch.setattr(torch.linalg, "svd", svd)


@pytest.mark.parametrize("error", OOM_ERRORS, ids=["OutOfMemoryError", "RuntimeError"])
@pytest.mark.parametrize("exact_below", [512, 0], ids=["exact", "iterative"])
def test_out_of_memory_during_svd(tmp_path, caplog, monkeypatch, error, exact_below):
    trainer, _callback = run(tmp_path, out_of_memory(monkeypatch, error), caplog, exact_below=exact_below)
    assert trainer.state.global_step == MAX_STEPS
    names = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value")]
    for name in names:  # every layer failed at steps 2, 4, 6 and is logged once
        assert len(warnings_about(caplog, f"skipping {name} ", "out of memory")) == 1
    assert errors_in_history(trainer) == {0: 0, 2: 4, 4: 4, 6: 4}
    assert tensorboard_scalars(tmp_path / "tb", "spectral/errors") == [(0, 0), (2, 4), (4, 4), (6, 4)]


def test_out_of_memory_in_the_pretrained_snapshot_skips_the_layer(tmp_path, caplog, monkeypatch):
    from lora_spectral_callback import basis_store

    real = basis_store.pretrained_basis_and_spectrum

    failures = []

    def basis(W0, dtype, method):  # the first layer fails at train begin and at the retry before the step-0 measurement
        if len(failures) < 2 and W0.data_ptr() in failures + [W0.data_ptr()] * (not failures):
            failures.append(W0.data_ptr())
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(W0, dtype, method)

    monkeypatch.setattr(basis_store, "pretrained_basis_and_spectrum", basis)
    trainer, _callback = run(tmp_path, lambda model, step: None, caplog)
    assert trainer.state.global_step == MAX_STEPS
    assert len(warnings_about(caplog, "pretrained snapshot failed: OutOfMemoryError")) == 1
    assert errors_in_history(trainer) == {0: 1, 2: 0, 4: 0, 6: 0}  # retried at the next measurement


# -- a user hook that raises ---------------------------------------------------------------------------------------
def failing_hook(report):
    raise ZeroDivisionError("division by zero in the user's hook")


def test_on_alert_hook_that_raises(tmp_path, caplog):
    trainer, callback = run(
        tmp_path, lambda m, s: None, caplog, max_intruders=0, stop_training=False, on_alert=failing_hook
    )
    assert trainer.state.global_step == MAX_STEPS
    assert callback.last_report.intruders_total > 0  # the alert fired at every measurement
    assert len(warnings_about(caplog, "on_alert hook failed", "ZeroDivisionError")) == 1
    assert callback.last_report.errors == {"on_alert hook": "ZeroDivisionError: division by zero in the user's hook"}
    assert errors_in_history(trainer) == {s: 1 for s in MEASURED}
    assert tensorboard_scalars(tmp_path / "tb", "spectral/errors") == [(s, 1) for s in MEASURED]


# -- TensorBoard write errors --------------------------------------------------------------------------------------
def disk_fault(monkeypatch, code: int, steps):
    """The event file's low-level write fails with ``OSError(code)`` while the measured step is in ``steps``. It
    fails in SummaryWriter's background thread, exactly as a full disk / read-only remount would."""
    real = RecordWriter.write
    state = {"on": False}

    def write(self, data):
        if state["on"]:
            raise OSError(code, os.strerror(code))
        return real(self, data)

    monkeypatch.setattr(RecordWriter, "write", write)

    def fault(model, step):
        state["on"] = step in steps

    return fault


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_full_disk_once_then_recovers(tmp_path, caplog, monkeypatch):
    trainer, _callback = run(tmp_path, disk_fault(monkeypatch, errno.ENOSPC, {2}), caplog)
    assert trainer.state.global_step == MAX_STEPS
    assert len(warnings_about(caplog, "TensorBoard write failed", "No space left on device")) == 1
    assert errors_in_history(trainer) == {0: 0, 2: 1, 4: 0, 6: 0}  # the failure is counted in the log history
    # reopened at the next write: the series goes on in TensorBoard (step 2 is the one that was lost)
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tb", "spectral/intruders_total")] == [0, 4, 6]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_read_only_file_system_disables_the_writer(tmp_path, caplog, monkeypatch):
    trainer, callback = run(tmp_path, disk_fault(monkeypatch, errno.EROFS, range(2, 100)), caplog, max_steps=10)
    assert trainer.state.global_step == 10
    assert len(warnings_about(caplog, "TensorBoard write failed", "Read-only file system")) == 1
    assert len(warnings_about(caplog, "TensorBoard writing disabled after 3 consecutive failures")) == 1
    assert callback.writer is None
    # 2, 4, 6 failed (retrying by reopening the file); from 8 on no write is attempted, measuring goes on
    assert errors_in_history(trainer) == {0: 0, 2: 1, 4: 1, 6: 1, 8: 0, 10: 0}
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tb", "spectral/intruders_total")] == [0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_event_file_that_cannot_be_opened(tmp_path, caplog, monkeypatch):
    fault = disk_fault(monkeypatch, errno.ENOSPC, range(100))
    fault(None, 0)  # the disk is full before training starts
    trainer, _callback = run(tmp_path, fault, caplog)
    assert trainer.state.global_step == MAX_STEPS
    assert len(warnings_about(caplog, "TensorBoard open failed", "No space left on device")) == 1
    assert sorted(errors_in_history(trainer)) == MEASURED  # measured, and in the log history, all the same


# -- strict=True re-raises -----------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("fault", ["remove", "oom", "hook", "disk"])
def test_strict_reraises(tmp_path, caplog, monkeypatch, fault):
    options = {"strict": True}
    if fault == "remove":
        inject, expected = remove_layer, RuntimeError
    elif fault == "oom":
        inject, expected = out_of_memory(monkeypatch, OOM_ERRORS[0]), torch.OutOfMemoryError
    elif fault == "hook":
        inject, expected = (lambda m, s: None), ZeroDivisionError
        options.update(max_intruders=0, stop_training=False, on_alert=failing_hook)
    else:
        inject, expected = disk_fault(monkeypatch, errno.ENOSPC, {2}), OSError
    with pytest.raises(expected):
        run(tmp_path, inject, caplog, **options)
