"""The ``lora-spectral`` CLI against float64 recounts on saved tiny models, and its one-line errors."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

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


@pytest.fixture
def root(saved) -> Path:
    """The folder ``saved`` wrote base/, adapter/ and merged/ to."""
    return saved[0]


@pytest.fixture
def narrower(tmp_path):
    """A saved tiny BERT of hidden size 32, whose weights fit neither the saved base (64) nor its adapter."""
    tiny_bert(hidden=32).save_pretrained(tmp_path / "small")
    return tmp_path / "small"


def run_json(capsys, *argv: str) -> dict:
    capsys.readouterr()  # drop what building the fixtures printed (DeepSpeed announces its accelerator on stdout)
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


def test_table_include_and_top_k(root, capsys):
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


def test_tensorboard_output_has_callback_tags_and_pictures(root, capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def test_finetuned_on_the_merged_adapter_agrees_with_adapter_mode(root, capsys):
    """Two routes to one number: low-rank factors through the monitor, and the dense merged weights."""
    adapter = run_json(capsys, str(root / "base"), str(root / "adapter"), "--epsilon", "0.5,0.3")
    full = run_json(capsys, str(root / "base"), "--finetuned", str(root / "merged"), "--epsilon", "0.5,0.3")
    for name, layer in adapter["layers"].items():
        other = full["layers"][name.removeprefix("bert.")]  # AutoModel drops the task head's prefix
        assert other["intruders_by_epsilon"] == layer["intruders_by_epsilon"]
        assert other["effective_rank"] == pytest.approx(layer["effective_rank"], rel=1e-4)
    untouched = full["layers"]["encoder.layer.0.attention.self.key"]
    assert untouched["intruders"] == 0 and untouched["effective_rank"] == 0.0


# -- errors: one line, exit 1, never a traceback --------------------------------------------------------------
def test_missing_paths(root, capsys, tmp_path):
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


def test_adapter_and_finetuned_are_exclusive(root, capsys):
    assert_error(capsys, ["analyze", str(root / "base")], "exactly one of ADAPTER_DIR or --finetuned")
    assert_error(
        capsys, ["analyze", str(root / "base"), str(root / "adapter"), "--finetuned", str(root / "base")], "exactly one"
    )


def test_prompt_learning_adapter_has_nothing_to_measure(root, capsys, tmp_path):
    from peft import PromptTuningConfig

    prompt = get_peft_model(tiny_bert(), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    prompt.save_pretrained(tmp_path / "prompt")
    assert_error(
        capsys,
        ["analyze", str(root / "base"), str(tmp_path / "prompt")],
        "is a PROMPT_TUNING adapter",
        "nothing to measure",
    )


def test_adapter_with_mismatched_shapes(root, capsys, narrower):
    assert_error(capsys, ["analyze", str(narrower), str(root / "adapter")], "does not fit base model", "size mismatch")


def test_adapter_targets_absent_from_base(root, capsys, tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    assert_error(
        capsys,
        ["analyze", str(tmp_path / "gpt2"), str(root / "adapter")],
        "none of the adapter's target modules",
        "['dense', 'query', 'value']",
        "GPT2ForSequenceClassification",
    )


def test_finetuned_with_mismatched_shapes(root, capsys, narrower):
    assert_error(
        capsys, ["analyze", str(root / "base"), "--finetuned", str(narrower)], "shape mismatch for ", "base (100, 64)"
    )


def test_bad_options_are_usage_errors(root, capsys):
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
        "match none of the model's PEFT adapter layers",
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


# -- every task type and tuner PEFT can load: counts equal a float64 recount of PEFT's merged weights -------------
def as_matrix(module: torch.nn.Module) -> torch.Tensor:
    W = module.weight.detach()
    return W.T if type(module).__name__ == "Conv1D" else W.reshape(W.shape[0], -1)


def randomize_trainable(model, seed: int, scale: float) -> None:
    """Move every trainable parameter (adapters and saved heads) so the update is not PEFT's zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def check_saved_adapter(capsys, tmp_path, base, peft_config, saved_base=None, seed: int = 0, scale: float = 0.3):
    """Save ``saved_base`` (default: ``base``) and the adapter trained on ``base``, analyze them with the CLI, and
    compare with the float64 recount of PEFT's ``merge_and_unload()`` of the in-memory model against ``base``."""
    (saved_base or base).save_pretrained(tmp_path / "base")
    original = copy.deepcopy(base)
    model = get_peft_model(base, peft_config)
    randomize_trainable(model, seed, scale)
    model.save_pretrained(tmp_path / "adapter")
    data = run_json(capsys, str(tmp_path / "base"), str(tmp_path / "adapter"), "--epsilon", "0.5,0.3")
    names = list(data["layers"])
    merged_model = copy.deepcopy(model).double().merge_and_unload()
    merged = {n: as_matrix(merged_model.get_submodule(n)) for n in names}
    base_weights = {n: as_matrix(original.get_submodule(n)) for n in names}
    totals, per_layer = reference_counts(base_weights, merged, EPS)
    assert names and data["errors"] == {}
    assert not any(layer["uncertain"] for layer in data["layers"].values())  # no cosine within rounding of a threshold
    assert {n: layer["intruders"] for n, layer in data["layers"].items()} == per_layer
    assert data["intruders_total_by_epsilon"] == {"0.5": totals[0.5], "0.3": totals[0.3]}
    return data, per_layer


def test_seq_cls_adapter_with_a_head_of_another_size(capsys, tmp_path):
    """8 labels trained on a base saved with 2: the head saved in modules_to_save sets num_labels."""
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    _, per_layer = check_saved_adapter(capsys, tmp_path, tiny_bert(labels=8), config, saved_base=tiny_bert(labels=2))
    assert len(per_layer) == 4 and sum(per_layer.values()) > 0
    with pytest.raises(RuntimeError, match="size mismatch"):  # what PeftModel.from_pretrained alone does
        from transformers import AutoModelForSequenceClassification

        PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
        )


def test_token_cls_adapter_with_a_head_of_another_size(capsys, tmp_path):
    from transformers import BertForTokenClassification

    config = LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
    bert = tiny_bert(labels=5)
    tuned = BertForTokenClassification(bert.config)
    tuned.bert.load_state_dict(bert.bert.state_dict(), strict=False)
    base = BertForTokenClassification(tiny_bert(labels=3).config)
    base.bert.load_state_dict(bert.bert.state_dict(), strict=False)
    _, per_layer = check_saved_adapter(capsys, tmp_path, tuned, config, saved_base=base, seed=1)
    assert sum(per_layer.values()) > 0


def test_causal_lm_adapter_with_a_resized_vocabulary(capsys, tmp_path):
    """GPT-2 Conv1D LoRA; the embedding was resized (tokens added) and saved with the adapter."""
    base = tiny_gpt2()
    base.save_pretrained(tmp_path / "original")
    tuned = copy.deepcopy(base)
    tuned.resize_token_embeddings(104)
    config = LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["c_attn"], modules_to_save=["wte"])
    _, per_layer = check_saved_adapter(capsys, tmp_path, tuned, config, saved_base=base, seed=2)
    assert len(per_layer) == 2 and sum(per_layer.values()) > 0


def test_seq2seq_question_answering_and_feature_extraction_adapters(capsys, tmp_path):
    from transformers import BertForQuestionAnswering, BertModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    config = LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, target_modules=["q", "v"])
    _, per_layer = check_saved_adapter(capsys, tmp_path / "t5", t5, config, seed=4)
    assert len(per_layer) == 12 and sum(per_layer.values()) > 0  # 2 encoder self, 2 decoder self + 2 cross, q and v

    qa = BertForQuestionAnswering(tiny_bert().config)
    config = peft.LoKrConfig(task_type="QUESTION_ANS", r=4, alpha=8, target_modules=["query", "value"])
    _, per_layer = check_saved_adapter(capsys, tmp_path / "qa", qa, config, seed=10)
    assert sum(per_layer.values()) > 0

    for task, tuner in (("FEATURE_EXTRACTION", peft.VeraConfig), (None, peft.LoHaConfig)):
        config = tuner(task_type=task, r=8, target_modules=["query", "value"])
        _, per_layer = check_saved_adapter(capsys, tmp_path / str(task), BertModel(tiny_bert().config), config, seed=5)
        assert sum(per_layer.values()) > 0


def test_ia3_adapter_is_measured(capsys, tmp_path):
    config = peft.IA3Config(
        task_type="SEQ_CLS", target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"]
    )
    _, per_layer = check_saved_adapter(capsys, tmp_path, tiny_bert(), config, seed=6, scale=1.0)
    assert len(per_layer) == 8 and sum(per_layer.values()) > 0  # "output.dense" also matches attention.output.dense


def test_pissa_adapter_on_the_original_base_is_measured_against_it(capsys, tmp_path):
    """An adapter saved with init_lora_weights="pissa": PEFT runs PiSSA again on the base it is given; the monitor,
    created before the saved weights load, records B0 A0 and measures against the original base."""
    base = tiny_bert()
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="pissa"
    )
    _, per_layer = check_saved_adapter(capsys, tmp_path, base, config, seed=7, scale=0.05)
    assert sum(per_layer.values()) > 0


def test_initial_adapter_for_a_residual_base(capsys, tmp_path):
    """PEFT's PiSSA recipe: the residual base and the initial adapter are saved before training (the config's init
    set back to True); --initial-adapter turns the reference back into the original weights."""
    base = tiny_bert()
    original = copy.deepcopy(base)
    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights="olora"
    )
    model = get_peft_model(base, config)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "initial")
    copy.deepcopy(model).unload().save_pretrained(tmp_path / "residual")
    randomize_trainable(model, seed=8, scale=0.05)
    model.save_pretrained(tmp_path / "adapter")
    argv = [str(tmp_path / "residual"), str(tmp_path / "adapter"), "--epsilon", "0.5,0.3"]
    data = run_json(capsys, *argv, "--initial-adapter", str(tmp_path / "initial"))
    names = list(data["layers"])
    merged_model = copy.deepcopy(model).double().merge_and_unload()
    merged = {n: as_matrix(merged_model.get_submodule(n)) for n in names}
    residual = {n: as_matrix(model.get_submodule("base_model.model." + n).get_base_layer()) for n in names}
    for reference, argv_extra in (({n: as_matrix(original.get_submodule(n)) for n in names}, True), (residual, False)):
        if not argv_extra:  # without it, the residual base is all the CLI knows
            data = run_json(capsys, *argv)
        totals, per_layer = reference_counts(reference, merged, EPS)
        assert {n: layer["intruders"] for n, layer in data["layers"].items()} == per_layer
        assert data["intruders_total_by_epsilon"] == {"0.5": totals[0.5], "0.3": totals[0.3]}
