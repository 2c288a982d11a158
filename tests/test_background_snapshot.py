"""The pretrained snapshot in the background: training never waits for it, a layer it has not reached yet is reported
as pending (or exactly, while its update is still zero), and every number after it equals a float64 recount."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import reference_counts
from training import lora_bert, make_trainer
from transformers import TrainerCallback

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor
from lora_spectral_callback import basis_store as basis_store_module
from lora_spectral_callback.layers import readable_name

EPS = [0.5, 0.7]


@pytest.fixture
def held_snapshot(monkeypatch):
    """Pretrained SVDs that wait for ``release.set()`` when they run off the main thread, so a test decides when
    the background snapshot finishes."""
    release = threading.Event()
    real = basis_store_module.pretrained_basis_and_spectrum

    def held(W0, dtype, method):
        if threading.current_thread() is not threading.main_thread():
            assert release.wait(timeout=120), "the test never released the snapshot"
        return real(W0, dtype, method)

    monkeypatch.setattr(basis_store_module, "pretrained_basis_and_spectrum", held)
    return release


def weights(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(pretrained, merged) weight of every LoRA layer, through PEFT's own get_delta_weight."""
    base, merged = {}, {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A"):
            W0 = module.get_base_layer().weight.detach()
            base[readable_name(path)] = W0
            merged[readable_name(path)] = W0 + module.get_delta_weight("default").detach()
    return base, merged


def test_measure_never_waits_and_reports_pending_then_exact(held_snapshot):
    model = lora_bert(random_update=False)  # B = 0: the merged weights are the pretrained ones
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True)
    monitor.snapshot(wait=False)
    assert monitor.snapshot_pending

    unchanged = monitor.measure(0)  # update exactly zero: reported exactly, no basis needed
    assert unchanged.pending == [] and set(unchanged.layers) == {m.name for m in monitor.matrices}
    assert unchanged.intruders_total_by_epsilon == {"0.5": 0, "0.7": 0}
    assert reference_counts(*weights(model), EPS)[0] == {0.5: 0, 0.7: 0}
    assert all(layer.max_cos == [1.0] * 10 and layer.effective_rank == 0.0 for layer in unchanged.layers.values())

    with torch.no_grad():
        for m in monitor.matrices:
            m.module.lora_B["default"].weight.normal_(std=2.0)  # a real update: now a basis is needed
    waiting = monitor.measure(1)
    assert waiting.layers == {} and waiting.pending == [m.name for m in monitor.matrices]
    assert waiting.intruders_total == 0 and waiting.errors == {}

    held_snapshot.set()
    monitor.snapshot()  # waits for the background snapshot
    assert not monitor.snapshot_pending
    done = monitor.measure(2)
    totals, per_layer = reference_counts(*weights(model), EPS)
    assert done.pending == [] and done.errors == {}
    assert {n: r.intruders for n, r in done.layers.items()} == per_layer
    assert {float(e): n for e, n in done.intruders_total_by_epsilon.items()} == totals and totals[0.7] > 0


def test_start_decides_by_the_timed_first_layer():
    fast = SpectralMonitor(lora_bert(), progress=False, background_after=1e9)
    fast.start()
    assert not fast.snapshots.in_background and all(s.basis is not None for s in fast.snapshots.layers.values())
    slow = SpectralMonitor(lora_bert(), progress=False, background_after=0)
    slow.start()  # first layer on the calling thread, the rest in the background
    assert slow.snapshots.in_background
    slow.snapshot()
    assert all(s.basis is not None for s in slow.snapshots.layers.values())


def test_strict_failure_in_the_background_is_raised_on_the_caller(monkeypatch):
    def broken(W0, dtype, method):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(basis_store_module, "pretrained_basis_and_spectrum", broken)
    monitor = SpectralMonitor(lora_bert(), progress=False, strict=True)
    monitor.snapshot(wait=False)
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        monitor.snapshot()


class ReleaseAt(TrainerCallback):
    """Lets the held snapshot finish once training reaches ``step``: proof that training did not wait for it."""

    def __init__(self, release: threading.Event, step: int) -> None:
        self.release, self.step, self.reached = release, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.reached = state.global_step
            self.release.set()


def test_trainer_runs_while_the_snapshot_is_held(tmp_path, held_snapshot):
    model = lora_bert(random_update=True)
    pretrained, _ = weights(model)
    pretrained = {n: W.clone() for n, W in pretrained.items()}
    callback = LoRASpectralCallback(
        every_n_steps=2, epsilon=EPS, snapshot="background", log_dir=str(tmp_path / "tb"), progress=False, strict=True
    )
    release = ReleaseAt(held_snapshot, 2)  # after our step-2 measurement (callbacks run in order)
    trainer = make_trainer(tmp_path / "out", model, [callback, release], max_steps=6)
    trainer.train()
    assert release.reached == 2  # training went on while every SVD was held
    history = {h["step"]: h for h in trainer.state.log_history if "spectral/intruders_total" in h}
    # random B from step 0: no layer can be reported without its basis
    assert history[0]["spectral/pending"] == history[2]["spectral/pending"] == 4
    final = callback.last_report
    assert final.step == 6 and final.pending == [] and final.errors == {}
    totals, per_layer = reference_counts(pretrained, weights(model)[1], EPS)
    assert {n: r.intruders for n, r in final.layers.items()} == per_layer
    assert {float(e): n for e, n in final.intruders_total_by_epsilon.items()} == totals


def test_final_report_and_pictures_cover_every_layer_when_the_snapshot_ends_last(tmp_path, held_snapshot):
    """The last step's measurement ran before the snapshot finished: train end measures again, so the final report
    covers every layer; at step 0 the layers reported exactly without a basis are left out of the pictures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = lora_bert(random_update=False)  # B = 0 at step 0: every layer reported exactly, nothing to draw
    pretrained = {n: W.clone() for n, W in weights(model)[0].items()}
    callback = LoRASpectralCallback(
        every_n_steps=2,
        epsilon=EPS,
        snapshot="background",
        image_every_n_measurements=1,
        image_layers=-1,
        log_dir=str(tmp_path / "tb"),
        progress=False,
        strict=True,  # a failing picture would raise
    )
    release = ReleaseAt(held_snapshot, 4)  # after our measurement of the last step
    trainer = make_trainer(tmp_path / "out", model, [callback, release], max_steps=4)
    trainer.train()
    history = [h for h in trainer.state.log_history if "spectral/intruders_total" in h]
    at_4 = [h for h in history if h["step"] == 4]
    assert at_4[0]["spectral/pending"] == 4 and "spectral/pending" not in at_4[-1]
    final = callback.last_report
    assert final.step == 4 and final.pending == [] and final.errors == {}
    totals, per_layer = reference_counts(pretrained, weights(model)[1], EPS)
    assert {n: r.intruders for n, r in final.layers.items()} == per_layer
    assert {float(e): n for e, n in final.intruders_total_by_epsilon.items()} == totals
    images = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    images.Reload()
    drawn = {tag.removeprefix("spectral/cosine/") for tag in images.Tags()["images"] if "/cosine/" in tag}
    assert drawn == set(per_layer)


@pytest.mark.parametrize("shape", [(200, 160), (64, 96)])  # the solver's size and the dense SVD's
def test_zero_update_with_a_basis_is_reported_from_the_snapshot(shape):
    """B = 0 with the basis there: nothing is solved; the report is a float64 SVD of W0's, and pictures work."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(shape[1], shape[0])), LoraConfig(target_modules=["0"]))
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True)
    monitor.snapshot()
    (layer,) = monitor.measure(0).layers.values()
    (W0,) = weights(model)[0].values()
    S = torch.linalg.svdvals(W0.double())
    assert layer.iterations == 0 and layer.converged and layer.uncertain == 0
    assert layer.max_cos == [1.0] * 10 and layer.intruders_by_epsilon == {"0.5": 0, "0.7": 0}
    assert torch.allclose(torch.tensor(layer.singular_values, dtype=torch.float64), S[:10], rtol=1e-6)
    assert layer.pretrained_sigma1 == pytest.approx(float(S[0]), rel=1e-12)
    assert layer.effective_rank == 0.0 and layer.intruder_energy_share == 0.0 and layer.intruder_sigma_ratio == 0.0
    assert layer.first_intruder == 11
    (spectra,) = monitor.spectra().values()  # the top vectors are the pretrained ones: |cos| is the identity
    assert torch.allclose(
        torch.tensor(spectra.cosines, dtype=torch.float64)[:, :10], torch.eye(10, dtype=torch.float64), atol=1e-3
    )

    with torch.no_grad():
        model.base_model.model[0].lora_B["default"].weight.normal_(std=2.0)
    report = monitor.measure(1)  # then solved, from the pretrained vectors as a cold start would
    totals, _ = reference_counts(*weights(model), EPS)
    assert {float(e): n for e, n in report.intruders_total_by_epsilon.items()} == totals
    assert all(layer.converged for layer in report.layers.values())
