"""The ``lora-spectral`` CLI against float64 recounts on saved tiny models, and its one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from lora_spectral_callback.cli import main
from tests.helpers import reference_counts, tiny_bert, tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]
EPS = [0.5, 0.3]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny LAPACK calls are slower multi-threaded on a shared 2-core machine; the numbers do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomize_lora(model, seed: int = 1, scale: float = 0.3) -> None:
    """Non-trivial B and A (PEFT initialises B = 0, which would make the merged weight the base weight)."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            for factor in (module.lora_A["default"], module.lora_B["default"]):
                factor.weight.data = torch.randn(factor.weight.shape, generator=g) * scale


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """base/ (tiny BERT), adapter/ (LoRA r=4 on query, value and dense layers, random factors), their weights."""
    root = tmp_path_factory.mktemp("cli")
    base = tiny_bert(seed=0)
    base.save_pretrained(root / "base")
    base_weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    peft_model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    )
    randomize_lora(peft_model)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    merged_weights = {n: m.weight.detach().clone() for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)}
    return root, base_weights, merged_weights


def run_json(capsys, *argv: str) -> dict:
    assert main(["analyze", *argv, "--json", "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_error(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-spectral: error: "), err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_json_counts_equal_float64_recount_of_merged_weights(saved, capsys):
    root, base_weights, merged_weights = saved
    data = run_json(capsys, str(root / "base"), str(root / "adapter"), "--epsilon", "0.5,0.3")
    names = list(data["layers"])
    assert len(names) == 11  # 2 x (query, value, attention.output.dense, intermediate.dense, output.dense) + pooler
    totals, per_layer = reference_counts(
        {n: base_weights[n] for n in names}, {n: merged_weights[n] for n in names}, EPS
    )
    assert data["intruders_total_by_epsilon"] == {"0.5": totals[0.5], "0.3": totals[0.3]}
    assert {n: layer["intruders"] for n, layer in data["layers"].items()} == per_layer
    assert 0 < totals[0.3] < totals[0.5]  # the fixture is non-trivial at both thresholds
    for name in names:  # effective rank of the rank-4 update, from the float64 SVD of merged - base
        # (only its top r=4 values: the rest is fp32 rounding of the merge, ~1e-7 of the update)
        s = torch.linalg.svdvals(merged_weights[name].double() - base_weights[name].double())[:4]
        p = s / s.sum()
        expected = math.exp(float(-(p * p.log()).sum()))
        assert data["layers"][name]["effective_rank"] == pytest.approx(expected, rel=1e-6)


def test_table_include_and_top_k(saved, capsys):
    root, _, _ = saved
    assert (
        main(
            [
                "analyze",
                str(root / "base"),
                str(root / "adapter"),
                "--include",
                r"layer\.1\.attention\.self",
                "--top-k",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["layer", "intr@0.5"]
    rows = [line.split()[0] for line in lines[2:-2]]
    assert rows == ["bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.value"]
    assert lines[-1].startswith("total: ") and "in " in lines[-1] and "/2 layers" in lines[-1]


def test_subprocess_module_entry_point(saved):
    root, base_weights, merged_weights = saved
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_spectral_callback.cli",
            "analyze",
            str(root / "base"),
            str(root / "adapter"),
            "--json",
            "--include",
            "query",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    names = list(data["layers"])
    totals, _ = reference_counts({n: base_weights[n] for n in names}, {n: merged_weights[n] for n in names}, [0.5])
    assert data["intruders_total"] == totals[0.5] and len(names) == 2


def test_tensorboard_output_has_callback_tags_and_pictures(saved, capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = saved
    assert (
        main(
            [
                "analyze",
                str(root / "base"),
                str(root / "adapter"),
                "--tensorboard",
                str(tmp_path),
                "--image-layers",
                "2",
                "--no-progress",
            ]
        )
        == 0
    )
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "spectral/intruders_total" in tags["scalars"]
    assert "spectral/intruders/bert.pooler.dense" in tags["scalars"]
    images = tags["images"]
    assert "spectral/intruder_grid" in images
    assert (
        sum(t.startswith("spectral/cosine/") for t in images) == 2
        and sum(t.startswith("spectral/spectrum/") for t in images) == 2
    )
    assert "spectral/summary/text_summary" in tags["tensors"]


def dense_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = module.weight
        elif isinstance(module, torch.nn.Embedding):
            out[name] = module.weight.T
    return out


def test_finetuned_mode_matches_float64_recount(tmp_path, capsys):
    base = tiny_bert(seed=0)
    base.save_pretrained(tmp_path / "base")
    tuned = tiny_bert(seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a full-rank small change everywhere plus a strong rank-2 change in one matrix
        for module in tuned.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.add_(0.002 * torch.randn(module.weight.shape, generator=g))
        query = tuned.bert.encoder.layer[0].attention.self.query.weight
        query.add_(torch.randn(64, 2, generator=g) @ torch.randn(2, 64, generator=g) * 0.2)
    tuned.save_pretrained(tmp_path / "tuned")
    data = run_json(
        capsys, str(tmp_path / "base"), "--finetuned", str(tmp_path / "tuned"), "--epsilon", "0.5", "--epsilon", "0.3"
    )
    # AutoModel loads the backbone (no classification head): names are BertModel's. Every Linear and Embedding
    # is compared, embeddings as (dim, vocabulary) like PEFT's embedding LoRA.
    W0, W = dense_weights(base.bert), dense_weights(tuned.bert)
    assert set(data["layers"]) == set(W0)
    totals, per_layer = reference_counts(W0, W, EPS)
    assert data["intruders_total_by_epsilon"] == {"0.5": totals[0.5], "0.3": totals[0.3]}
    assert {n: layer["intruders"] for n, layer in data["layers"].items()} == per_layer
    assert per_layer["encoder.layer.0.attention.self.query"] >= 1
    assert data["layers"]["pooler.dense"]["effective_rank"] > 30  # a dense random update is high-rank
    assert data["layers"]["pooler.dense"]["singular_values"][0] == pytest.approx(
        float(torch.linalg.svdvals(W["pooler.dense"].detach().double())[0]), rel=1e-5
    )


def test_finetuned_on_the_merged_adapter_agrees_with_adapter_mode(saved, capsys):
    """Two routes to one number: low-rank factors through the monitor, and the dense merged weights."""
    root, _, _ = saved
    adapter = run_json(capsys, str(root / "base"), str(root / "adapter"), "--epsilon", "0.5,0.3")
    full = run_json(capsys, str(root / "base"), "--finetuned", str(root / "merged"), "--epsilon", "0.5,0.3")
    for name, layer in adapter["layers"].items():
        other = full["layers"][name.removeprefix("bert.")]  # AutoModel drops the task head's prefix
        assert other["intruders_by_epsilon"] == layer["intruders_by_epsilon"]
        assert other["effective_rank"] == pytest.approx(layer["effective_rank"], rel=1e-4)
    untouched = full["layers"]["encoder.layer.0.attention.self.key"]
    assert untouched["intruders"] == 0 and untouched["effective_rank"] == 0.0


# -- errors: one line, exit 1, never a traceback --------------------------------------------------------------
def test_missing_paths(saved, capsys, tmp_path):
    root, _, _ = saved
    assert_error(
        capsys, ["analyze", str(tmp_path / "nope"), str(root / "adapter")], "base model directory", "does not exist"
    )
    assert_error(capsys, ["analyze", str(root / "base"), str(tmp_path / "nope")], "adapter directory", "does not exist")
    assert_error(capsys, ["analyze", str(root / "base"), str(root / "base")], "has no adapter_config.json")
    assert_error(
        capsys,
        ["analyze", str(root / "base"), "--finetuned", str(tmp_path)],
        "fine-tuned model directory",
        "config.json",
    )


def test_adapter_and_finetuned_are_exclusive(saved, capsys):
    root, _, _ = saved
    assert_error(capsys, ["analyze", str(root / "base")], "exactly one of ADAPTER_DIR or --finetuned")
    assert_error(
        capsys, ["analyze", str(root / "base"), str(root / "adapter"), "--finetuned", str(root / "base")], "exactly one"
    )


def test_adapter_that_is_not_lora(saved, capsys, tmp_path):
    root, _, _ = saved
    ia3 = get_peft_model(
        tiny_bert(), IA3Config(task_type="SEQ_CLS", target_modules=["query", "value"], feedforward_modules=[])
    )
    ia3.save_pretrained(tmp_path / "ia3")
    assert_error(capsys, ["analyze", str(root / "base"), str(tmp_path / "ia3")], "is a IA3 adapter, not LoRA")


def test_adapter_with_mismatched_shapes(saved, capsys, tmp_path):
    root, _, _ = saved
    tiny_bert(hidden=32).save_pretrained(tmp_path / "small")
    assert_error(
        capsys, ["analyze", str(tmp_path / "small"), str(root / "adapter")], "does not fit base model", "size mismatch"
    )


def test_adapter_targets_absent_from_base(saved, capsys, tmp_path):
    root, _, _ = saved
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert_error(
        capsys,
        ["analyze", str(tmp_path / "gpt2"), str(root / "adapter")],
        "none of the adapter's target modules",
        "['dense', 'query', 'value']",
        "GPT2ForSequenceClassification",
    )


def test_finetuned_with_mismatched_shapes(saved, capsys, tmp_path):
    root, _, _ = saved
    tiny_bert(hidden=32).save_pretrained(tmp_path / "small")
    assert_error(
        capsys,
        ["analyze", str(root / "base"), "--finetuned", str(tmp_path / "small")],
        "shape mismatch for ",
        "base (100, 64)",
    )


def test_bad_options_are_usage_errors(saved, capsys):
    root, _, _ = saved
    for bad in (["--epsilon", "1.5"], ["--top-k", "0"], ["--epsilon", "x"]):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", str(root / "base"), str(root / "adapter"), *bad])
        assert exit_.value.code == 2
        assert "lora-spectral analyze: error: argument" in capsys.readouterr().err
    assert_error(
        capsys,
        ["analyze", str(root / "base"), str(root / "adapter"), "--include", "("],
        "--include",
        "regular expression",
    )
    assert_error(
        capsys,
        ["analyze", str(root / "base"), str(root / "adapter"), "--include", "nomatch"],
        "match none of the model's LoRA layers",
    )


def test_peft_reference_loads_the_same_adapter(saved):
    """The fixture's adapter is what PEFT itself loads (guards the recount's inputs)."""
    root, _, merged_weights = saved
    from transformers import AutoModelForSequenceClassification

    model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(root / "base"), root / "adapter"
    )
    merged = model.merge_and_unload()
    name = "bert.encoder.layer.0.attention.self.query"
    assert torch.allclose(merged.get_submodule(name).weight, merged_weights[name])
