"""SmolLM2-135M-Instruct: do the spectral signals predict forgetting, and does scaling intruders down help?

Shuttleworth et al. 2024 (arXiv 2410.21228, v3) claim for LLMs that forgetting is localised in the intruder
directions and grows with their singular values, and that scaling those directions down after training reduces
forgetting while keeping most of the task. This benchmark tests both on a causal LM.

Task (new knowledge): the capitals of 16 invented countries (examples/sft_smollm2.py's generator, seed 0 for every
run), trained as one-turn chats with the loss on the answer tokens only; AdamW, linear schedule with 10 % warm-up,
batch 4, float32, a plain torch loop. Runs: LoRA on all seven linear kinds of the 30 decoder layers (210 matrices)
at r = 1, 8, 64 (alpha = 2r) and rsLoRA r = 64 (alpha = 2r, scaling alpha / sqrt(r)), and full fine-tuning of the
same 210 matrices (embeddings, norms and head frozen). A SpectralMonitor watches every run (the callback's engine;
mode="full" against a copy of W0 for full fine-tuning) and every ``--every`` steps the signals, the relative update
norm, the forgetting and the task accuracy are recorded (benchmarks/llm_eval.py says how they are measured).
Afterwards, on the final adapters of the runs in ``--mitigate``: ``scale_intruders`` (which="top", lambda in 0.75, 0.5, 0) against the
control of scaling the whole adapter (B <- c B) to the same total update norm.

    PYTHONPATH=$PWD python benchmarks/llm_forgetting.py --results benchmarks/results/llm_forgetting.json
    PYTHONPATH=$PWD python benchmarks/llm_forgetting.py --results benchmarks/results/llm_forgetting.json --table-only
    PYTHONPATH=$PWD python benchmarks/llm_forgetting.py --quick     # smoke run, one tiny configuration, ~1 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from continual import relative_update_norm
from llm_eval import answer_nll, batches, load_self_distill_set, task_accuracy, task_items, training_examples
from llm_report import report
from sft_smollm2 import KINDS, invented_capitals, load_model, lora_config
from smollm2_model import smollm2_path
from tasks import add_record_options, load_records, save_records

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.mitigation import scale_intruders

BATCH = 4
COUNTRIES = 16
LAMBDAS = (0.75, 0.5, 0.0)
# rates from low (little forgetting) to 1e-2 (examples/sft_smollm2.py's, where intruders appear; r = 64 diverges
# there); the first two are mitigated; a sweep cut short keeps a spread of ranks and rates
LORA = [(8, 1e-2), (64, 3e-3), (1, 1e-2), (8, 3e-3), (64, 1e-2), (8, 5e-4)]


def spec(text: str) -> tuple[int, float]:
    """``"rank:lr"`` as (rank, lr)."""
    rank, lr = text.split(":")
    return int(rank), float(lr)


@dataclass
class Config:
    kind: str  # "lora", "rslora" or "full"
    rank: int | None
    lr: float

    @property
    def name(self) -> str:
        return f"full FT, lr {self.lr:.2g}" if self.kind == "full" else f"{self.kind} r={self.rank}, lr {self.lr:.2g}"


def build(config: Config, seed: int, path: str):
    """The model to train and a snapshotted monitor on its 210 linear matrices."""
    torch.manual_seed(seed)  # LoRA A from the seed
    model = load_model(path)
    if config.kind == "full":
        pattern = r"\.(" + "|".join(KINDS) + r")$"
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.endswith(f".{k}.weight") for k in KINDS))
        monitor = SpectralMonitor(model, mode="full", include=pattern, progress=False)
    else:
        from peft import get_peft_model

        assert config.rank is not None
        lora = lora_config(config.rank)
        lora.use_rslora = config.kind == "rslora"
        model = get_peft_model(model, lora)
        monitor = SpectralMonitor(model, progress=False)
    monitor.snapshot()
    return model, monitor


def point(model, monitor: SpectralMonitor, step: int, evaluate) -> dict:
    """The signals, the update norm and the two outcomes at one step."""
    report_ = monitor.measure(step=step)
    assert report_ is not None  # None only on a non-main rank of a sharded model
    return {
        "step": step,
        "intruders": report_.intruders_total,
        "energy_share": report_.intruder_energy_share,
        "sigma_ratio": report_.intruder_sigma_ratio,
        "first": report_.first_intruder,
        "update_norm": relative_update_norm(monitor),
        **evaluate(model),
    }


def train(model, monitor: SpectralMonitor, examples: list, config: Config, steps: int, every: int, evaluate) -> list:
    """AdamW with a linear schedule and 10 % warm-up; a measurement point every ``every`` steps and at the end."""
    from transformers import get_linear_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    data = list(batches(examples, BATCH))
    history = []
    model.train()
    for step in range(1, steps + 1):
        ids, mask, labels = data[(step - 1) % len(data)]
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % every == 0 or step == steps:
            history.append(point(model, monitor, step, evaluate))
    return history


@torch.no_grad()
def adapter_norm(model, adapter: str) -> float:
    """``sqrt(sum_layers ||s B A||_F^2)`` of one adapter, from the factors (``trace(B^T B A A^T)``)."""
    total = 0.0
    for module in model.modules():
        if adapter in getattr(module, "lora_A", {}):
            B = module.lora_B[adapter].weight.double()
            A = module.lora_A[adapter].weight.double()
            total += module.scaling[adapter] ** 2 * float(((B.T @ B) * (A @ A.T)).sum())
    return total**0.5


@torch.no_grad()
def mitigate(model, monitor: SpectralMonitor, evaluate, lambdas: tuple[float, ...], final: dict) -> list[dict]:
    """Per lambda: the top intruder of each matrix scaled by lambda, and the whole adapter scaled to the same total
    update norm (Frobenius, summed over the 210 layers). The monitor's bases are reused (a fresh float64 basis per
    call took ~2 min per lambda on one thread). Where no matrix has an intruder both adapters are the original one:
    its ``final`` outcomes are recorded instead of evaluating it twice more."""
    norm = adapter_norm(model, "default")
    b_weights = [m.lora_B["default"].weight for m in model.modules() if "default" in getattr(m, "lora_B", {})]
    rows = []
    for lam in lambdas:
        result = scale_intruders(model, lam=lam, which="top", new_adapter_name="scaled", monitor=monitor)
        scaled_norm = adapter_norm(model, "scaled")
        same = result.directions_scaled == 0
        intruder = {"directions": result.directions_scaled, **(final if same else evaluate(model))}
        model.set_adapter("default")
        model.delete_adapter("scaled")
        c = scaled_norm / norm
        if same:
            rows.append({"lam": lam, "norm_ratio": c, "intruder": intruder, "control": {"c": c, **final}})
            continue
        for w in b_weights:
            w.mul_(c)
        control = {"c": c, **evaluate(model)}
        for w in b_weights:
            w.div_(c)
        rows.append({"lam": lam, "norm_ratio": c, "intruder": intruder, "control": control})
    return rows


def run(config: Config, seed: int, opts, tokenizer, path: str, distill: list[dict], items: list, base_nll: float):
    model, monitor = build(config, seed, path)
    capitals = invented_capitals(COUNTRIES, seed=0)
    examples = training_examples(tokenizer, capitals, opts.steps * BATCH, seed=seed)

    def evaluate(m) -> dict:
        nll = answer_nll(m, tokenizer, distill)
        return {"nll": nll, "forgetting": nll - base_nll, "task_acc": task_accuracy(m, items)}

    t0 = time.perf_counter()
    history = train(model, monitor, examples, config, opts.steps, opts.every, evaluate)
    record = {"config": config.name, "kind": config.kind, "rank": config.rank, "lr": config.lr, "seed": seed}
    record |= {"steps": opts.steps, "train_seconds": time.perf_counter() - t0, "history": history}
    if config.kind == "lora" and f"{config.rank}:{config.lr:g}" in {f"{r}:{lr:g}" for r, lr in opts.mitigate}:
        t0 = time.perf_counter()
        final = {k: history[-1][k] for k in ("nll", "forgetting", "task_acc")}
        record["mitigation"] = mitigate(model, monitor, evaluate, opts.lambdas, final)
        record["mitigation_seconds"] = time.perf_counter() - t0
    return record


def configs(opts) -> list[Config]:
    """Highest LoRA rate first, then rsLoRA, the lower rates and full fine-tuning: a sweep cut short keeps a spread."""
    lora = [Config("lora", r, lr) for r, lr in opts.lora] + [Config("rslora", r, lr) for r, lr in opts.rslora]
    return lora + [Config("full", None, lr) for lr in opts.full_lr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: LoRA r=8, 4 steps, 8 prompts, one lambda")
    parser.add_argument("--lora", type=spec, nargs="*", default=LORA, help="LoRA runs as rank:lr, in this order")
    parser.add_argument("--rslora", type=spec, nargs="*", default=[(64, 1e-3)], help="rsLoRA runs as rank:lr")
    parser.add_argument("--full-lr", type=float, nargs="*", default=[5e-5], help="full fine-tuning runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--every", type=int, default=16, help="a measurement point every N steps")
    parser.add_argument("--lambdas", type=float, nargs="*", default=list(LAMBDAS))
    parser.add_argument("--mitigate", type=spec, nargs="*", default=LORA[:2], help="LoRA runs (rank:lr) to mitigate")
    parser.add_argument("--plot", default=None, help="write the figure here (PNG, needs matplotlib)")
    add_record_options(parser)
    opts = parser.parse_args()
    if opts.quick:
        opts.lora = opts.mitigate = [(8, 2e-3)]
        opts.rslora, opts.full_lr, opts.seeds = [], [], opts.seeds[:1]
        opts.steps, opts.every, opts.lambdas = 4, 2, [0.5]
    torch.set_num_threads(opts.threads)
    records = load_records(opts.results)
    start = time.perf_counter()
    if not opts.table_only:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        path = str(smollm2_path())
        tokenizer = AutoTokenizer.from_pretrained(path)
        base = load_model(path)
        distill = load_self_distill_set(base, tokenizer)[: 8 if opts.quick else None]
        items = task_items(tokenizer, invented_capitals(COUNTRIES, seed=0))
        base_nll = answer_nll(base, tokenizer, distill)
        print(f"base model: NLL {base_nll:.4f} per answer token, task accuracy {task_accuracy(base, items):.3f}")
        del base
        done = {(r["config"], r["seed"]) for r in records}
        for seed in opts.seeds:
            for config in configs(opts):
                if (config.name, seed) in done:
                    continue
                records.append(run(config, seed, opts, tokenizer, path, distill, items, base_nll))
                r = records[-1]
                h = r["history"][-1]
                mit = " ".join(
                    f"λ{m['lam']:g}: {m['intruder']['forgetting']:.3f}/{m['control']['forgetting']:.3f}"
                    for m in r.get("mitigation", [])
                )
                print(
                    f"{config.name}, seed {seed}: forgetting {h['forgetting']:.4f}, task {h['task_acc']:.3f}, "
                    f"intruders {[p['intruders'] for p in r['history']]}, σ ratio {h['sigma_ratio']:.2f}, "
                    f"‖ΔW‖/‖W0‖ {h['update_norm']:.4f} ({r['train_seconds']:.0f} s train, "
                    f"{r.get('mitigation_seconds', 0):.0f} s mitigation) {mit}",
                    flush=True,
                )
                save_records(opts.results, records)
    print(report(records, opts.plot))
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
