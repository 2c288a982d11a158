"""Supervised fine-tuning of the real SmolLM2-135M-Instruct with TRL (examples/sft_smollm2.py), short runs: LoRA on
all 210 linear matrices, DoRA, QLoRA on a bitsandbytes 4-bit base, full fine-tuning of two layers, and the CLI on
the saved adapter; counts, energy share and sigma ratio against a float64 full-SVD recount of PEFT's own weights.

The model is converted once per machine (examples/smollm2_model.py; `.ci/run` prepares it); without it (no
package registry, no `gguf`) these tests skip with the reason."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import reference_spectra, signals_from_spectra

from lora_spectral_callback import LoRASpectralCallback
from lora_spectral_callback.cli import main as cli_main
from lora_spectral_callback.layers import readable_name

pytest.importorskip("trl")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import sft_smollm2 as sft

EPS = [0.5, 0.3, 0.7]
STEPS = 3


@pytest.fixture(scope="module")
def smollm2():
    """(checkpoint path, tokenizer), one thread: LAPACK on these small matrices is slower threaded on 2 cores."""
    try:
        path = str(sft.smollm2_path())
    except RuntimeError as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be obtained: {e}")
    from transformers import AutoTokenizer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield path, AutoTokenizer.from_pretrained(path)
    torch.set_num_threads(before)


def short_sft(smollm2, out: Path, model=None, peft_config=None, lr: float = 5e-2, **callback_options):
    """STEPS optimizer steps of SFT on the invented capitals (batch 2, at most 32 tokens), measured at step 0 and
    at the end. The snapshot blocks: the last step is a scheduled measurement, which a background snapshot still
    running would leave with layers pending."""
    path, tokenizer = smollm2
    callback = LoRASpectralCallback(
        every_n_steps=STEPS,
        epsilon=EPS,
        log_dir=str(out / "tb"),
        progress=False,
        strict=True,
        snapshot="blocking",
        **callback_options,
    )
    data = sft.chat_dataset(sft.invented_capitals(), n=2 * STEPS)
    trainer = sft.sft_trainer(
        sft.load_model(path) if model is None else model,
        tokenizer,
        data,
        str(out),
        [callback],
        peft_config=peft_config,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        max_length=32,
        learning_rate=lr,  # constant and large: a few steps must already write new directions
        lr_scheduler_type="constant",
        report_to=[],
    )
    trainer.train()
    assert callback.last_report.step == STEPS
    return trainer, callback


def peft_weights(model, merge: bool) -> tuple[dict, dict]:
    """(pretrained, merged) weights of every adapted layer from PEFT alone: the base layer's weight (dequantized
    if quantized) plus ``get_delta_weight``, or with ``merge`` the weights of ``merge_and_unload()`` of a copy
    (DoRA: the delta alone lacks the magnitude rescaling)."""
    from peft.utils.integrations import dequantize_module_weight

    layers = {readable_name(n): m for n, m in model.named_modules() if hasattr(m, "lora_A")}
    base = {n: dequantize_module_weight(m.get_base_layer()).detach().float() for n, m in layers.items()}
    if not merge:
        return base, {n: base[n].double() + m.get_delta_weight("default").double() for n, m in layers.items()}
    merged_model = dict(copy.deepcopy(model).merge_and_unload().named_modules())
    return base, {n: merged_model[n].weight.detach() for n in layers}


def assert_counts_equal(report, spectra: dict) -> None:
    """Every layer's count at every epsilon equals the float64 recount's, exactly; a failure names each differing
    layer with both max |cos| lists and ``uncertain``, so a decision near a threshold shows as one."""
    expected = {n: {f"{e:g}": sum(c < e for c in cos) for e in EPS} for n, (cos, _, _) in spectra.items()}
    assert set(report.layers) == set(expected)
    differing = {
        n: {
            "ours": r.intruders_by_epsilon,
            "float64": expected[n],
            "our max_cos": r.max_cos,
            "float64 max_cos": spectra[n][0],
            "uncertain": r.uncertain,
        }
        for n, r in report.layers.items()
        if r.intruders_by_epsilon != expected[n]
    }
    assert not differing, f"counts differ from the float64 recount: {differing}"
    assert report.intruders_total_by_epsilon == {f"{e:g}": sum(c[f"{e:g}"] for c in expected.values()) for e in EPS}
    assert report.errors == {}


def assert_equal_to_recount(report, base: dict, merged: dict) -> None:
    """Counts equal a float64 recount (``assert_counts_equal``); energy share and sigma ratio match it."""
    spectra = reference_spectra(base, merged)  # the slow part: 2 float64 SVDs per matrix, once
    assert_counts_equal(report, spectra)
    signals, (share, ratio, first) = signals_from_spectra(spectra, EPS[0])
    for name, (layer_share, layer_ratio, layer_first) in signals.items():
        layer = report.layers[name]
        assert layer.intruder_energy_share == pytest.approx(layer_share, rel=1e-3, abs=1e-6)
        assert layer.intruder_sigma_ratio == pytest.approx(layer_ratio, rel=1e-3)
        assert layer.first_intruder == layer_first
    assert report.intruder_energy_share == pytest.approx(share, rel=1e-3)
    assert report.intruder_sigma_ratio == pytest.approx(ratio, rel=1e-3)
    assert report.first_intruder == first


@pytest.fixture(scope="module")
def lora_run(smollm2, tmp_path_factory):
    """The example's LoRA SFT, shortened, with its adapter saved for the CLI."""
    out = tmp_path_factory.mktemp("smollm2-lora")
    trainer, callback = short_sft(smollm2, out, peft_config=sft.lora_config())
    trainer.model.save_pretrained(out / "adapter")
    return trainer, callback, out / "adapter"


def test_lora_on_all_210_matrices_equals_float64_recount(lora_run):
    trainer, callback, _ = lora_run
    report = callback.last_report
    assert len(report.layers) == 210  # 30 layers x q, k, v, o, gate, up, down
    base, merged = peft_weights(trainer.model, merge=False)
    shapes = {tuple(w.shape) for w in base.values()}
    assert shapes == {(576, 576), (192, 576), (1536, 576), (576, 1536)}  # GQA: k_proj / v_proj are 192 x 576
    assert_equal_to_recount(report, base, merged)
    assert 0 < report.intruders_total < 2100  # non-trivial: new directions already, not everywhere


def test_cli_on_the_saved_adapter_gives_the_last_measurement(lora_run, smollm2, capsys):
    _, callback, adapter = lora_run
    capsys.readouterr()
    argv = ["analyze", smollm2[0], str(adapter), "--epsilon", "0.5,0.3,0.7", "--json", "--no-progress"]
    assert cli_main(argv) == 0
    data = json.loads(capsys.readouterr().out)
    report = callback.last_report
    assert data["intruders_total_by_epsilon"] == report.intruders_total_by_epsilon
    assert {n: layer["intruders_by_epsilon"] for n, layer in data["layers"].items()} == {
        n: layer.intruders_by_epsilon for n, layer in report.layers.items()
    }


@pytest.mark.slow  # one more SFT; DoRA's row scaling is checked on small models in test_peft_variants.py
def test_dora_equals_float64_recount(smollm2, tmp_path):
    trainer, callback = short_sft(smollm2, tmp_path, peft_config=sft.lora_config(use_dora=True, layers=[0, 15, 29]))
    report = callback.last_report
    assert len(report.layers) == 21
    assert_equal_to_recount(report, *peft_weights(trainer.model, merge=True))
    assert report.intruders_total > 0


def test_qlora_on_a_4bit_base_equals_recount_against_the_dequantized_base(smollm2, tmp_path):
    pytest.importorskip("bitsandbytes")
    model = sft.load_model(smollm2[0], quantize_4bit=True)
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Params4bit"
    trainer, callback = short_sft(smollm2, tmp_path, model=model, peft_config=sft.lora_config(layers=[0, 15, 29]))
    report = callback.last_report
    assert len(report.layers) == 21
    assert_equal_to_recount(report, *peft_weights(trainer.model, merge=False))
    assert report.intruders_total > 0


def test_full_finetuning_of_two_layers_equals_float64_recount(smollm2, tmp_path):
    """No PEFT: layers 0 and 29 train (everything else frozen, to keep it short), measured in full mode."""
    model = sft.load_model(smollm2[0])
    trained = r"model\.layers\.(0|29)\.(self_attn|mlp)\.\w+_proj$"
    pattern = re.compile(trained)
    for name, p in model.named_parameters():
        p.requires_grad_(bool(pattern.search(name.removesuffix(".weight"))))
    names = [n for n, m in model.named_modules() if pattern.search(n)]
    pretrained = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    _, callback = short_sft(smollm2, tmp_path, model=model, lr=1e-2, mode="full", include=trained)
    report = callback.last_report
    assert sorted(report.layers) == sorted(names) and len(names) == 14
    current = {n: model.get_submodule(n).weight.detach() for n in names}
    assert_counts_equal(report, reference_spectra(pretrained, current))
    assert report.intruders_total_by_epsilon["0.7"] > 0
