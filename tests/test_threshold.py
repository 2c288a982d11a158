"""Decisions at the threshold: a max |cos| within 1e-6 of epsilon (far inside the 4.9e-4 of an fp16 basis and the
fp32 solver's bound) is settled by a float64 pass, so the count equals a float64 full SVD's on either side."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_spectral_callback import SpectralMonitor, measure
from lora_spectral_callback.linalg import KrylovSpace
from lora_spectral_callback.measure import decompose
from lora_spectral_callback.metrics import max_abs_cosine, pretrained_basis_and_spectrum
from lora_spectral_callback.writers import headline_metrics, scalar_metrics

N, EPS = 200, 0.5


def pieces(t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W0, B, A`` in float64 for a 200 x 200 layer whose rank-1 update ``B A`` points along
    ``u = cos(t) u0_1 + sin(t) (u0_8 + u0_9 + u0_10 + u0_11) / 2`` (``u0_j``: pretrained left singular vectors), strong
    enough to be the merged weight's top singular vector: its max |cos| is about ``cos(t)`` near ``t = pi / 3``."""
    g = torch.Generator().manual_seed(0)
    U0 = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64)).Q
    W0 = (U0 * torch.linspace(2.0, 0.1, N, dtype=torch.float64)) @ V0.T
    angle = torch.tensor(t, dtype=torch.float64)
    u = torch.cos(angle) * U0[:, 0] + torch.sin(angle) * U0[:, 7:11].sum(dim=1) / 2
    return W0, 8.0 * u[:, None], V0[:, 3][None, :]


def float64_top_cos(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """max |cos| of the merged weight's top left singular vector with the pretrained basis, from full float64 SVDs."""
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U = torch.linalg.svd(W0 + B @ A, full_matrices=False)[0][:, :1]
    return float(max_abs_cosine(U, U0)[0])


def t_at(target: float) -> float:
    """The angle whose float64 max |cos| is ``target`` (bisection: it falls as t grows on [0.9, 1.2])."""
    lo, hi = 0.9, 1.2
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float64_top_cos(*pieces(mid)) > target else (lo, mid)
    return (lo + hi) / 2


def lora_model(W0: torch.Tensor, B: torch.Tensor, A: torch.Tensor):
    """The layer as a PEFT LoRA model (r=1, scaling 1) with exactly these fp32 weights."""
    base = torch.nn.Sequential(torch.nn.Linear(N, N, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(W0)
    model = get_peft_model(base, LoraConfig(r=1, lora_alpha=1, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(B)
        layer.lora_A["default"].weight.copy_(A)
    return model


@pytest.mark.parametrize("offset", [-1e-6, 1e-6])
def test_a_cosine_next_to_epsilon_is_decided_as_in_float64(offset):
    W0, B, A = (x.float().double() for x in pieces(t_at(EPS + offset)))  # what the fp32 model will hold
    exact = float64_top_cos(W0, B, A)
    assert abs(exact - EPS) < 2e-6 and (exact < EPS) == (offset < 0)
    model = lora_model(W0, B, A)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False)  # fp32 solver, fp16 basis: 4.9e-4 too coarse
    monitor.snapshot()
    report = monitor.measure(1)
    (layer,) = report.layers.values()
    assert layer.resolved >= 1 and layer.uncertain == 0 and layer.converged
    assert layer.intruders == int(exact < EPS) + sum(c < EPS for c in layer.max_cos[1:])
    assert layer.max_cos[0] == pytest.approx(exact, abs=1e-12)  # the float64 pass's cosine, not the fp32 one
    assert report.uncertain == 0 and scalar_metrics(report)["spectral/uncertain"] == 0
    assert "spectral/uncertain" not in headline_metrics(report)  # in the log history only when > 0
    assert scalar_metrics(report)["spectral/resolved"] == report.resolved >= 1
    # the public function alone, with its default float64 basis, decides the same
    (matrix,) = monitor.matrices
    basis = pretrained_basis_and_spectrum(matrix.base_weight().float())[0].half()
    alone = decompose(matrix, basis, monitor.config)
    assert alone.uncertain == 0 and alone.resolved >= 1
    assert float(alone.max_cos[0]) == pytest.approx(exact, abs=1e-12)


def test_a_decision_float64_cannot_make_stays_uncertain_and_reaches_the_log():
    """A report with an undecided layer puts spectral/uncertain into the Trainer's log line too."""
    from lora_spectral_callback.report import LayerReport, SpectralReport

    layer = LayerReport(1, {"0.5": 1}, [0.4999], [1.0], 1.0, 1.0, 1.0, 1.0, 1, converged=False, uncertain=1)
    report = SpectralReport.from_layers(3, [0.5], {"x": layer})
    assert report.uncertain == 1 and headline_metrics(report)["spectral/uncertain"] == 1


def test_a_resolved_layer_counts_the_steps_of_both_passes():
    """``iterations`` of a layer the float64 pass settled is the fp32 solve's steps plus the float64 pass's."""
    W0, B, A = (x.float().double() for x in pieces(t_at(EPS + 1e-6)))
    monitor = SpectralMonitor(lora_model(W0, B, A), epsilon=EPS, progress=False)
    monitor.snapshot()
    (matrix,) = monitor.matrices
    basis = monitor.snapshots.layers[matrix.name].basis
    with mock.patch.object(measure, "_resolve", lambda matrix, config, rough, *rest: rough):
        rough = decompose(matrix, basis, monitor.config)  # what the fp32 solve leaves open
    assert rough.uncertain >= 1 and rough.svd.iterations >= 1
    fine = decompose(
        matrix,
        measure.float64_basis(matrix),
        replace(monitor.config, compute_dtype="float64"),
        warm_start=KrylovSpace(rough.svd.block.Q.double()),
    )
    (layer,) = monitor.measure(1).layers.values()
    assert layer.resolved >= 1 and fine.svd.iterations >= 1
    assert layer.iterations == rough.svd.iterations + fine.svd.iterations
