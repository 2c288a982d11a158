"""ForgettingProxy: exact at init, equal to an independent recomputation after training, logged by the callback."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from lora_spectral_callback.forgetting import ForgettingProxy, mean_pooled_last_hidden
from tests.helpers import RandomTokens, tiny_bert, tiny_gpt2
from tests.training import make_trainer

COS = "spectral/forgetting/embedding_cosine"


def _batch(n: int = 6, length: int = 12, seed: int = 3, pad: int = 4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[: n // 2, length - pad :] = 0  # some padding, so the pooling mask matters
    return {"input_ids": ids, "attention_mask": mask}


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "c_attn"]))


def _perturb(model, seed: int = 0, scale: float = 0.3):
    """What a high-learning-rate run does to the adapters: large B and A."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def test_no_drift_at_init():
    model = _lora(tiny_bert().double())  # PEFT initialises B = 0: the model is its base
    bert = ForgettingProxy(_batch())(model)
    assert bert == {COS: pytest.approx(1.0, abs=1e-12)}
    gpt = _lora(tiny_gpt2().double())
    batch = _batch()
    metrics = ForgettingProxy({**batch, "labels": batch["input_ids"]}, kind=["embedding_cosine", "loss"])(gpt)
    assert metrics[COS] == pytest.approx(1.0, abs=1e-12)
    assert metrics["spectral/forgetting/loss_increase"] == pytest.approx(0.0, abs=1e-12)


def test_drift_equals_independent_recomputation_and_restores_mode():
    batch = _batch()
    reference = tiny_bert().double().eval()  # the base model, rebuilt from the same seed: no adapter involved
    model = _lora(tiny_bert().double())
    _perturb(model)
    model.train()
    got = ForgettingProxy(batch)(model)[COS]
    assert model.training  # restored
    merged = copy.deepcopy(model).merge_and_unload().eval()  # PEFT's own merge, not the adapter forward
    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(
            mean_pooled_last_hidden(merged, batch), mean_pooled_last_hidden(reference, batch), dim=-1
        ).mean()
        # pooling by hand, to check mean_pooled_last_hidden itself
        h = merged(**batch, output_hidden_states=True).hidden_states[-1]
        m = batch["attention_mask"][..., None].double()
        torch.testing.assert_close(mean_pooled_last_hidden(merged, batch), (h * m).sum(1) / m.sum(1))
    assert got == pytest.approx(float(expected), abs=1e-12)
    assert got < 0.999


def test_loss_kind_matches_the_models_own_loss():
    batch = _batch()
    batch["labels"] = batch["input_ids"]
    model = _lora(tiny_gpt2().double())
    with torch.no_grad():
        base_loss = float(tiny_gpt2().double().eval()(**batch).loss)
    _perturb(model, scale=0.5)
    metrics = ForgettingProxy(batch, kind="loss")(model)
    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():
        loss = float(merged(**batch).loss)
    assert metrics["spectral/forgetting/loss"] == pytest.approx(loss, rel=1e-10)
    assert metrics["spectral/forgetting/loss_increase"] == pytest.approx(loss - base_loss, rel=1e-8)


def test_bad_options_fail_with_a_message():
    with pytest.raises(ValueError, match="kind="):
        ForgettingProxy(_batch(), kind="perplexity")
    with pytest.raises(ValueError, match="labels"):
        ForgettingProxy(_batch(), kind="loss")
    with pytest.raises(ValueError, match="reference_batch"):
        ForgettingProxy([1, 2, 3])


def _train(tmp_path, proxy, lr=5e-2, steps=12):
    from lora_spectral_callback import LoRASpectralCallback

    model = _lora(tiny_bert())
    callback = LoRASpectralCallback(
        every_n_steps=4, log_dir=str(tmp_path / "tb"), progress=False, forgetting_proxy=proxy
    )
    trainer = make_trainer(tmp_path, model, [callback], steps, data=RandomTokens(n=64), learning_rate=lr, seed=42)
    trainer.train()
    return trainer


def test_callback_logs_the_proxy_beside_the_spectral_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _train(tmp_path, ForgettingProxy(_batch()))
    logged = [e for e in trainer.state.log_history if COS in e]
    assert [e["step"] for e in logged] == [0, 4, 8, 12]
    assert all("spectral/intruders_total" in e for e in logged)
    assert logged[0][COS] == pytest.approx(1.0, abs=1e-6)  # B = 0 at step 0 (float32 model)
    assert logged[-1][COS] < 1 - 1e-4  # a high learning rate has moved the embeddings
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars(COS)] == pytest.approx([e[COS] for e in logged], abs=1e-6)


def test_a_failing_proxy_never_stops_training(tmp_path):
    def broken(model):
        raise RuntimeError("boom")

    trainer = _train(tmp_path, broken, steps=4)
    assert trainer.state.global_step == 4
    spectral = [e for e in trainer.state.log_history if "spectral/intruders_total" in e]
    assert [e["step"] for e in spectral] == [0, 4] and not any(COS in e for e in spectral)


def test_first_call_base_for_full_fine_tuning():
    batch = _batch()
    model = tiny_bert().double()  # no adapter: disable_adapter() does not exist
    with pytest.raises(TypeError, match="PEFT model"):
        ForgettingProxy(batch)(model)
    proxy = ForgettingProxy(batch, base="first_call")
    assert proxy(model) == {COS: pytest.approx(1.0, abs=1e-12)}  # the first call is the base
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # what training might do
            layer.output.dense.weight.add_(torch.randn_like(layer.output.dense.weight))
        expected = torch.nn.functional.cosine_similarity(
            mean_pooled_last_hidden(model.eval(), batch), mean_pooled_last_hidden(reference, batch), dim=-1
        ).mean()
    assert proxy(model)[COS] == pytest.approx(float(expected), abs=1e-12) and float(expected) < 0.99
    with pytest.raises(ValueError, match=r"base='copy' is invalid"):
        ForgettingProxy(batch, base="copy")
