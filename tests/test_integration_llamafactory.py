"""LLaMA-Factory's Python entry point with our callback: ``run_exp(args, callbacks=[LoRASpectralCallback(...)])``
on a tiny Llama built here (random init, a word-level tokenizer, an Alpaca-format JSON data set), counts against a
float64 recount of PEFT's merge. LLaMA-Factory pins transformers <= 5.6 and peft <= 0.18.1, so it lives in an
environment of its own (see docs/integrations.md); elsewhere this test skips."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch
from integration_helpers import assert_counts_match
from training import tensorboard_scalars

EPS = [0.5, 0.7]
WORDS = ["<pad>", "<unk>", "<s>", "</s>", *(f"w{i}" for i in range(60)), "Human:", "Assistant:"]


def tiny_llama_dir(path) -> str:
    """A 2-layer Llama and its tokenizer saved as LLaMA-Factory loads any model: a local directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def alpaca_dir(path) -> str:
    g = torch.Generator().manual_seed(0)

    def sentence() -> str:
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 60, (6,), generator=g))

    path.mkdir()
    rows = [{"instruction": sentence(), "input": "", "output": sentence()} for _ in range(32)]
    (path / "tiny.json").write_text(json.dumps(rows))
    (path / "dataset_info.json").write_text(json.dumps({"tiny": {"file_name": "tiny.json"}}))
    return str(path)


def test_llamafactory_run_exp_with_callback(tmp_path, monkeypatch):
    if importlib.util.find_spec("llamafactory") is None:
        pytest.skip("llamafactory is not installed (it pins transformers <= 5.6, peft <= 0.18.1: a separate env)")
    try:
        import torchaudio  # noqa: F401
    except (ImportError, OSError):  # absent, or PyPI's CUDA build beside a CPU torch: LLaMA-Factory imports it at
        monkeypatch.setitem(sys.modules, "torchaudio", types.ModuleType("torchaudio"))  # load; text SFT never calls it
    from llamafactory.train import tuner

    from lora_spectral_callback import LoRASpectralCallback

    callback = LoRASpectralCallback(every_n_steps=2, epsilon=EPS, log_dir=str(tmp_path / "tb"), progress=False)
    args = {
        "stage": "sft",
        "do_train": True,
        "model_name_or_path": tiny_llama_dir(tmp_path / "model"),
        "dataset": "tiny",
        "dataset_dir": alpaca_dir(tmp_path / "data"),
        "template": "default",
        "cutoff_len": 32,
        "finetuning_type": "lora",
        "lora_target": "q_proj,v_proj",
        "lora_rank": 4,
        "output_dir": str(tmp_path / "run"),
        "max_steps": 4,
        "per_device_train_batch_size": 8,
        "learning_rate": 5e-2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
    }
    tuner.run_exp(args, callbacks=[callback])
    report = callback.last_report
    assert report.step == 4 and len(report.layers) == 4 and report.intruders_total > 0
    assert [step for step, _ in tensorboard_scalars(tmp_path / "tb", "spectral/intruders_total")] == [0, 2, 4]
    assert_counts_match(report, callback.monitor.model, EPS)
