"""scale_intruders: the scaled component is exactly lambda times what it was, checked against float64 full SVDs
and PEFT's own reduce_intruder_dimension."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.intruders import reduce_intruder_dimension

from lora_spectral_callback.layers import readable_name
from lora_spectral_callback.metrics import max_abs_cosine
from lora_spectral_callback.mitigation import scale_intruders
from tests.helpers import tiny_bert

LAM = 0.75


def _lora_model(seed: int = 0, r: int = 4, rslora: bool = False, dora: bool = False):
    """A float64 tiny BERT whose LoRA factors are large random matrices: every update direction intrudes."""
    model = get_peft_model(
        tiny_bert(seed=seed).double(),
        LoraConfig(r=r, lora_alpha=2 * r, target_modules=["query", "value"], use_rslora=rslora, use_dora=dora),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return model


def _merged(model, adapter: str) -> dict[str, torch.Tensor]:
    """Base weight + PEFT's own delta weight of one adapter, per LoRA layer (float64)."""
    return {
        readable_name(n): (m.get_base_layer().weight + m.get_delta_weight(adapter)).detach().double()
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def _reference_intruders(W0: torch.Tensor, W: torch.Tensor, eps: float = 0.5, k: int = 10):
    """Float64 full SVD of W and the indices of its intruders among the top k (paper Alg. 1)."""
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    idx = torch.nonzero(max_abs_cosine(U[:, :k], U0) < eps).flatten().tolist()
    return U, S, Vh, idx


@pytest.mark.parametrize("which", ["top", "all"])
@pytest.mark.parametrize("rslora", [False, True])
def test_scaled_component_is_exactly_lambda_times(which, rslora):
    model = _lora_model(rslora=rslora)
    base = {
        readable_name(n): m.get_base_layer().weight.detach().double()
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }
    before = _merged(model, "default")
    result = scale_intruders(model, lam=LAM, which=which)
    assert model.active_adapters == ["intruders_scaled"]
    after = _merged(model, "intruders_scaled")
    for name, W in before.items():
        U, S, Vh, idx = _reference_intruders(base[name], W)
        chosen = idx[:1] if which == "top" else idx
        assert chosen and [d.index for d in result.scaled[name]] == chosen
        # W_new - W = (lambda - 1) sum_i sigma_i u_i v_i^T, with the triplets of an independent full SVD
        expected = (LAM - 1) * (U[:, chosen] * S[chosen]) @ Vh[chosen]
        torch.testing.assert_close(after[name] - W, expected, rtol=0, atol=1e-10 * float(S[0]))
        # u_i^T W_new v_i = lambda sigma_i, and the rest of the spectrum is unchanged
        torch.testing.assert_close(torch.einsum("mi,mn,in->i", U[:, chosen], after[name], Vh[chosen]), LAM * S[chosen])
        scaled = S.clone()
        scaled[chosen] *= LAM
        torch.testing.assert_close(torch.linalg.svdvals(after[name]), scaled.sort(descending=True).values)
    assert result.truncation_error == {}


def test_refactor_all_matches_peft_reduce_intruder_dimension():
    ours, theirs = _lora_model(seed=1), _lora_model(seed=1)
    result = scale_intruders(ours, lam=LAM, which="all", mode="refactor", new_adapter_name="mitigated")
    reduce_intruder_dimension(theirs, new_adapter_name="mitigated", mitigation_lambda=LAM, logging_sink=None)
    mine, peft = _merged(ours, "mitigated"), _merged(theirs, "mitigated")
    for name in mine:
        assert ours.base_model.get_submodule(name).lora_A["mitigated"].weight.shape[0] == 4  # rank kept
        torch.testing.assert_close(mine[name], peft[name], rtol=0, atol=1e-8)
    assert set(result.truncation_error) == set(mine) and all(0 < e < 1 for e in result.truncation_error.values())


def test_layers_without_intruders_are_copied_unchanged():
    model = _lora_model()
    before = _merged(model, "default")
    result = scale_intruders(model, lam=LAM, epsilon=0.01)  # nothing is that far from the pretrained basis
    assert result.directions_scaled == 0
    for name, W in _merged(model, "intruders_scaled").items():
        torch.testing.assert_close(W, before[name], rtol=0, atol=1e-12)


def test_unmonitored_layers_keep_their_update():
    model = _lora_model()
    before = _merged(model, "default")
    result = scale_intruders(model, lam=LAM, include="query")
    after = _merged(model, "intruders_scaled")
    assert set(result.scaled) == {n for n in before if n.endswith("query")}
    for name in before:
        if name.endswith("value"):
            torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-12)
        else:
            assert not torch.allclose(after[name], before[name])


def test_bad_options_fail_with_a_message():
    model = _lora_model()
    with pytest.raises(ValueError, match="lam="):
        scale_intruders(model, lam=1.5)
    with pytest.raises(ValueError, match="which="):
        scale_intruders(model, which="some")
    with pytest.raises(ValueError, match="new_adapter_name="):
        scale_intruders(model, new_adapter_name="default")
    with pytest.raises(ValueError, match="DoRA"):
        scale_intruders(_lora_model(dora=True))
