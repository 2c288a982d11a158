"""Reproduce Shuttleworth et al. 2024 (arXiv 2410.21228) with the paper's protocol on all-MiniLM-L6-v2, from the
callback's own TensorBoard logs.

Protocol (the paper's, scaled to a 6-layer model and a CPU): LoRA on *all* linear layers of the transformer
blocks (query, key, value, attention output, intermediate, output: 36 matrices), alpha = 2r, ranks 1 / 8 / 64,
rsLoRA r = 64 and full fine-tuning of the same layers, several epochs, linear schedule with 10 % warm-up, batch
16, several seeds. Learning rates follow the paper's pattern as far as we recall it (its appendix values were not
at hand): r = 1 at 2x the r = 8 rate, full fine-tuning 15x lower, the rate lowered for high rank: r = 64 at half
the r = 8 rate (at the r = 8 rate it did not learn the task in a pilot run: accuracy 0.50), rsLoRA r = 64 (scaling
alpha / sqrt(r) = 16, 8x LoRA's 2) at a quarter (our choice; it trained to 100 % in the pilot). r = 8 also runs at
half and twice its rate for the learning-rate trend. The task is generated: "does *apple* come before *river* in
this sentence of filler words" (needs attention to change; max length 20).

Every run has :class:`LoRASpectralCallback` attached (``mode="full"`` for full fine-tuning) with epsilon in
0.1 ... 0.9 and a forgetting proxy (mean cosine of the sentence embeddings of 16 unrelated sentences to the base
model's, 1 = no drift); counts, intruder energy share, sigma ratio and first intruder position are read back from
the event files at every measurement. Prints markdown tables (mean +- sd over seeds), writes the plot and the
per-run records (``--results``, JSON; ``--table-only`` redraws from them), and applies the paper's mitigation
(``scale_intruders``, lambda = 0.75) to the r = 8 run of the first seed.

    PYTHONPATH=$PWD python benchmarks/reproduce_paper.py --results benchmarks/results/reproduce_paper.json  # 34 min
    PYTHONPATH=$PWD python benchmarks/reproduce_paper.py --quick  # smoke run, 1 min
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from tasks import (
    ALL_LINEAR,
    TextTask,
    accuracy,
    add_record_options,
    load_classifier,
    load_records,
    minilm_path,
    order_examples,
    reference_batch,
    save_records,
)

EPSILONS = [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]  # first is the callback's primary threshold
LORA_LR = 5e-4  # LoRA r = 8; the others in the paper's pattern relative to it (see the module docstring)
BATCH = 16
COSINE = "spectral/forgetting/embedding_cosine"
SIGNALS = {  # what is kept of each measurement: {short name: TensorBoard tag}
    "intruders": "spectral/intruders_total",
    "energy_share": "spectral/intruder_energy_share",
    "sigma_ratio": "spectral/intruder_sigma_ratio",
    "first": "spectral/first_intruder",
    "cosine": COSINE,
}


@dataclass
class Run:
    name: str
    rank: int | None  # None: full fine-tuning
    lr: float
    rslora: bool = False


def protocol(lr: float = LORA_LR) -> list[Run]:
    return [
        Run("LoRA r=1", 1, 2 * lr),
        Run("LoRA r=8", 8, lr),
        Run("LoRA r=8, lr/2", 8, lr / 2),
        Run("LoRA r=8, 2×lr", 8, 2 * lr),
        Run("LoRA r=64", 64, lr / 2),
        Run("rsLoRA r=64", 64, lr / 4, rslora=True),
        Run("full FT", None, lr / 15),
    ]


def train(run: Run, train_data, eval_data, ref_batch, steps: int, every: int, out_dir: str, seed: int):
    """Fine-tune one configuration; return (model, accuracy, TensorBoard dir with the spectral series)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from lora_spectral_callback import LoRASpectralCallback
    from lora_spectral_callback.forgetting import ForgettingProxy

    model = load_classifier(seed)
    log_dir = os.path.join(out_dir, f"{run.name}-{seed}")
    options = dict(every_n_steps=every, epsilon=EPSILONS, log_dir=log_dir, progress=False)
    proxy = ForgettingProxy(ref_batch, base="first_call")  # the step-0 measurement is the base model
    if run.rank is None:  # the callback's full fine-tuning mode: the same layers, against copies of their weights
        callback = LoRASpectralCallback(mode="full", include=ALL_LINEAR + "$", forgetting_proxy=proxy, **options)
    else:
        config = LoraConfig(
            r=run.rank,
            lora_alpha=2 * run.rank,
            use_rslora=run.rslora,
            target_modules=ALL_LINEAR,
            task_type="SEQ_CLS",
            lora_dropout=0.0,
        )
        model = get_peft_model(model, config)
        callback = LoRASpectralCallback(forgetting_proxy=proxy, **options)
    args = TrainingArguments(
        output_dir=os.path.join(out_dir, "trainer", run.name),
        per_device_train_batch_size=BATCH,
        learning_rate=run.lr,
        max_steps=steps,
        warmup_steps=steps // 10,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=steps,
        save_strategy="no",
        report_to=[],
        seed=seed,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_data, callbacks=[callback])
    trainer.train()
    return model, accuracy(model, eval_data), log_dir


def read_series(log_dir: str) -> dict[str, dict[int, float]]:
    """All scalar series of one run's TensorBoard directory: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def record(run: Run, seed: int, acc: float, series: dict[str, dict[int, float]], seconds: float) -> dict:
    """What the tables need of one run: the signals at every measured step, counts by epsilon and effective rank
    at the end."""
    steps = sorted(series["spectral/intruders_total"])
    end = steps[-1]
    ranks = [v[end] for k, v in series.items() if k.startswith("spectral/effective_rank/")]
    return {
        "name": run.name,
        "seed": seed,
        "lr": run.lr,
        "accuracy": acc,
        "seconds": seconds,
        "steps": steps,
        **{key: [series[tag][s] for s in steps] for key, tag in SIGNALS.items()},
        "by_epsilon": {f"{e:g}": series[f"spectral/intruders_total/eps_{e:g}"][end] for e in sorted(EPSILONS)},
        "effective_rank": sum(ranks) / len(ranks),
        "layers_with_intruders": {  # at the end: {matrix: [intruders, energy share, sigma ratio]}
            tag.removeprefix("spectral/intruders/"): [
                v[end],
                series[tag.replace("intruders/", "intruder_energy_share/")][end],
                series[tag.replace("intruders/", "intruder_sigma_ratio/")][end],
            ]
            for tag, v in series.items()
            if tag.startswith("spectral/intruders/") and v[end] > 0
        },
    }


def mitigate(model, eval_data, ref_batch) -> dict[str, float]:
    """The paper's Sec. 5 intervention on a trained LoRA model: accuracy, intruders and drift before/after."""
    from lora_spectral_callback import SpectralMonitor
    from lora_spectral_callback.forgetting import ForgettingProxy
    from lora_spectral_callback.mitigation import scale_intruders

    def state() -> tuple[float, int, float, float]:
        report = SpectralMonitor(model, epsilon=0.5, progress=False).measure()
        assert report is not None  # None only on a non-main rank of a sharded model
        cosine = ForgettingProxy(ref_batch)(model)[COSINE]
        return accuracy(model, eval_data), report.intruders_total, cosine, report.intruder_sigma_ratio

    before = state()
    result = scale_intruders(model, lam=0.75, epsilon=0.5, which="top")
    after = state()
    return {
        "acc_before": before[0],
        "acc_after": after[0],
        "intruders_before": before[1],
        "intruders_after": after[1],
        "cos_before": before[2],
        "cos_after": after[2],
        "sigma_ratio_before": before[3],
        "sigma_ratio_after": after[3],
        "directions_scaled": result.directions_scaled,
    }


def spread(values: list[float], digits: int = 1) -> str:
    """``mean ± sd`` (sample sd over seeds; just the mean for one seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["name"], []).append(r)
    return out


def tables(records: list[dict], epochs: int) -> str:
    groups = grouped(records)
    seeds = sorted({r["seed"] for r in records})
    lines = [
        f"End of training ({epochs} epochs), mean ± sd over seeds {seeds}; signals at ε = 0.5 over the 36 matrices "
        "(top-10 each, so at most 360 intruders); first intruder per seed (11 = none in any matrix):",
        "",
        "| run | lr | accuracy | intruders | energy share | σ ratio | first intruder | eff. rank ΔW | emb. cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in groups.items():
        cells = [
            spread([r["accuracy"] for r in rs], 3),
            spread([r["intruders"][-1] for r in rs]),
            spread([r["energy_share"][-1] for r in rs], 3),
            spread([r["sigma_ratio"][-1] for r in rs], 2),
            ", ".join(str(int(r["first"][-1])) for r in rs),  # per seed: a mean of 1s and 11s means nothing
            spread([r["effective_rank"] for r in rs]),
            spread([r["cosine"][-1] for r in rs], 3),
        ]
        lines.append(f"| {name} | {rs[0]['lr']:.3g} | " + " | ".join(cells) + " |")
    eps = list(records[0]["by_epsilon"])
    lines += ["", "Intruders at the end by ε (mean over seeds; paper Fig. 4):", ""]
    lines += ["| run | " + " | ".join(f"ε={e}" for e in eps) + " |", "|---" * (len(eps) + 1) + "|"]
    for name, rs in groups.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{statistics.fmean(r['by_epsilon'][e] for r in rs):.1f}" for e in eps) + " |"
        )
    steps = records[0]["steps"]
    per_epoch = steps[-1] // epochs
    marks = [s for s in steps if s % per_epoch == 0 and s > 0]
    lines += ["", "Over training, intruders / energy share / σ ratio at the end of each epoch (mean over seeds):", ""]
    lines += ["| run | " + " | ".join(f"epoch {s // per_epoch}" for s in marks) + " |", "|---" * (len(marks) + 1) + "|"]
    for name, rs in groups.items():
        cells = []
        for s in marks:
            i = rs[0]["steps"].index(s)
            mean = [statistics.fmean(r[k][i] for r in rs) for k in ("intruders", "energy_share", "sigma_ratio")]
            cells.append(f"{mean[0]:.1f} / {mean[1]:.3f} / {mean[2]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        ("intruders", "intruders at ε=0.5 (sum of 36 matrices)", "(b) intruders over training"),
        ("energy_share", "intruder energy share (model-wide)", "(c) energy share over training"),
        ("sigma_ratio", "max intruder σ / pretrained σ₁", "(d) σ ratio over training"),
    ]
    for name, rs in grouped(records).items():
        eps = [float(e) for e in rs[0]["by_epsilon"]]
        counts = torch.tensor([list(r["by_epsilon"].values()) for r in rs], dtype=torch.float64)
        axes[0, 0].errorbar(
            eps, counts.mean(0), yerr=counts.std(0) if len(rs) > 1 else None, marker="o", ms=3, capsize=2, label=name
        )
        for ax, (key, ylabel, title) in zip(axes.flat[1:], panels, strict=True):
            values = torch.tensor([r[key] for r in rs], dtype=torch.float64)
            mean = values.mean(0)
            (line,) = ax.plot(rs[0]["steps"], mean, label=name)
            if len(rs) > 1:
                sd = values.std(0)
                ax.fill_between(rs[0]["steps"], mean - sd, mean + sd, color=line.get_color(), alpha=0.15, lw=0)
            ax.set(xlabel="training step", ylabel=ylabel, title=title)
    axes[0, 0].set(xlabel="ε", ylabel="intruders at the end", title="(a) intruders vs ε (paper Fig. 4)")
    axes[0, 0].legend(fontsize=7)
    seeds = len({r["seed"] for r in records})
    fig.suptitle(f"all-MiniLM-L6-v2, LoRA on all linear layers, α=2r; mean ± sd over {seeds} seeds")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few steps, one seed: smoke run")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-size", type=int, default=1600)
    parser.add_argument("--every", type=int, default=50, help="measure every N optimizer steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", help="run only these configurations (names as in the table)")
    parser.add_argument("--plot", default="docs/reproduction.png")
    add_record_options(parser)
    opts = parser.parse_args()
    if opts.quick:
        opts.epochs, opts.train_size, opts.every, opts.seeds = 1, 96, 3, opts.seeds[:1]
    torch.set_num_threads(opts.threads)  # more threads than free cores slows torch down badly on a shared machine

    records = load_records(opts.results)
    start = time.perf_counter()
    if not opts.table_only:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        eval_data = TextTask(tokenizer, order_examples(64 if opts.quick else 512, seed=10_000))
        ref = reference_batch(tokenizer)
        steps = opts.epochs * opts.train_size // BATCH
        done = {(r["name"], r["seed"]) for r in records}
        with tempfile.TemporaryDirectory() as out_dir:
            for seed in opts.seeds:
                train_data = TextTask(tokenizer, order_examples(opts.train_size, seed=seed))
                for run in protocol():
                    if (run.name, seed) in done or (opts.only and run.name not in opts.only):
                        continue
                    t0 = time.perf_counter()
                    model, acc, log_dir = train(run, train_data, eval_data, ref, steps, opts.every, out_dir, seed)
                    records.append(record(run, seed, acc, read_series(log_dir), time.perf_counter() - t0))
                    r = records[-1]
                    print(
                        f"{run.name} seed {seed}: accuracy {acc:.3f}, intruders {r['intruders'][-1]:.0f}, "
                        f"share {r['energy_share'][-1]:.3f}, σ ratio {r['sigma_ratio'][-1]:.2f} "
                        f"in {r['seconds']:.0f} s",
                        flush=True,
                    )
                    save_records(opts.results, records)
                    if run.name == "LoRA r=8" and seed == opts.seeds[0]:
                        m = mitigate(model, eval_data, ref)
                        print(
                            f"\nMitigation on LoRA r=8, seed {seed} (scale_intruders, λ=0.75, ε=0.5, top intruder "
                            f"per matrix, {m['directions_scaled']} directions): accuracy {m['acc_before']:.3f} → "
                            f"{m['acc_after']:.3f}, intruders {m['intruders_before']} → {m['intruders_after']}, σ ratio "
                            f"{m['sigma_ratio_before']:.2f} → {m['sigma_ratio_after']:.2f}, "
                            f"embedding cosine to base {m['cos_before']:.4f} → {m['cos_after']:.4f}\n",
                            flush=True,
                        )
    plot(records, opts.plot)
    print(
        f"\nall-MiniLM-L6-v2, order task, {opts.train_size} examples × {opts.epochs} epochs, batch {BATCH}, "
        f"LoRA on all linear layers (36 matrices), α = 2r\n"
    )
    print(tables(records, opts.epochs))
    print(f"\nplot: {opts.plot}; {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
