"""Tables and figure for benchmarks/llm_forgetting.py: per-configuration outcomes, correlations of each signal and
baseline with forgetting (across runs and within runs, bootstrap 95 % intervals over runs), the mitigation table."""

from __future__ import annotations

import math
import random
import statistics

from continual import correlations, spearman

SIGNALS = ("intruders", "energy_share", "sigma_ratio", "first")
ACROSS = (*SIGNALS, "update_norm", "lr")  # the step is the same at every run's end: a baseline within runs only
WITHIN = (*SIGNALS, "update_norm", "step")
LEARNED = 0.5  # below this final task accuracy a run diverged or did not learn: the second across-run table drops it


def cell(values: list[float], digits: int) -> str:
    """``mean ± sd`` (the sd only with two or more values)."""
    if not values:
        return "n/a"
    sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{sd}"


def mean_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95 % interval of the mean, resampling the values (runs)."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def head(intro: str, columns: list[str]) -> list[str]:
    """A blank line, the introducing sentence, and a markdown table header."""
    return ["", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def by_config(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["config"], []).append(r)
    return out


def final_points(records: list[dict]) -> list[dict]:
    return [{"seed": r["seed"], "lr": r["lr"], **r["history"][-1]} for r in records]


def outcome_table(records: list[dict]) -> list[str]:
    columns = ["configuration", "runs", "forgetting (ΔNLL)", "task acc.", "intruders", "energy share", "σ ratio"]
    columns += ["first", "‖ΔW‖/‖W0‖", "s"]
    lines = head("Per configuration, mean ± sd over seeds, at the last step:", columns)
    for name, rs in by_config(records).items():
        last = [r["history"][-1] for r in rs]
        cols = [("forgetting", 3), ("task_acc", 2), ("intruders", 1), ("energy_share", 3), ("sigma_ratio", 2)]
        cols += [("first", 1), ("update_norm", 4)]
        cells = " | ".join(cell([p[k] for p in last], d) for k, d in cols)
        lines.append(f"| {name} | {len(rs)} | {cells} | {statistics.fmean(r['train_seconds'] for r in rs):.0f} |")
    return lines


def training_table(records: list[dict]) -> list[str]:
    """Per configuration and measurement step, means over seeds: how the signals and outcomes move in training."""
    lines = head(
        "Over training (means over seeds at each measurement step):",
        ["configuration", "step", "intruders", "energy share", "σ ratio", "first", "forgetting", "task acc."],
    )
    for name, rs in by_config(records).items():
        for i, step in enumerate(p["step"] for p in rs[0]["history"]):
            pts = [r["history"][i] for r in rs]
            cols = [("intruders", 1), ("energy_share", 3), ("sigma_ratio", 2), ("first", 1), ("forgetting", 3)]
            cells = " | ".join(f"{statistics.fmean(p[k] for p in pts):.{d}f}" for k, d in (*cols, ("task_acc", 2)))
            lines.append(f"| {name} | {step} | {cells} |")
    return lines


def across_table(records: list[dict], label: str) -> list[str]:
    pts = final_points(records)
    corr = correlations(pts, predictors=ACROSS)
    lines = head(
        f"Across runs ({label}: {len(pts)} runs, final point of each), Spearman / Pearson with forgetting, pooled "
        "[bootstrap 95 % CI, resampling runs]:",
        ["predictor", "Spearman [95 % CI]", "Pearson [95 % CI]"],
    )
    for name in ACROSS:
        cells = [
            f"{c.pooled:.2f} [{c.interval[0]:.2f}, {c.interval[1]:.2f}]"
            for c in (corr[f"{name}/{k}"] for k in ("spearman", "pearson"))
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def within_table(records: list[dict]) -> list[str]:
    lines = head(
        "Within runs (each run's measurement points; Spearman with forgetting per run, then the mean over runs "
        "[bootstrap 95 % CI, resampling runs]; runs where the predictor is constant are left out):",
        ["predictor", "runs", "mean Spearman [95 % CI]"],
    )
    loud = [r for r in records if any(p["intruders"] for p in r["history"])]
    rows = [(name, name, records) for name in WITHIN] + [("update_norm", "update_norm, runs with intruders", loud)]
    for name, label, runs in rows:
        rhos = [spearman([p[name] for p in r["history"]], [p["forgetting"] for p in r["history"]]) for r in runs]
        rhos = [v for v in rhos if not math.isnan(v)]
        if not rhos:
            lines.append(f"| {label} | 0 | n/a |")
            continue
        low, high = mean_interval(rhos)
        lines.append(f"| {label} | {len(rhos)} | {statistics.fmean(rhos):.2f} [{low:.2f}, {high:.2f}] |")
    quiet = [r["history"][-1]["forgetting"] for r in records if r["history"][-1]["intruders"] == 0]
    noisy = [r["history"][-1]["forgetting"] for r in records if r["history"][-1]["intruders"] > 0]
    if quiet and noisy:
        lines += [
            "",
            f"Final points without any intruder: {len(quiet)}, forgetting {min(quiet):.2f}–{max(quiet):.2f}; with "
            f"intruders: {len(noisy)}, forgetting {min(noisy):.2f}–{max(noisy):.2f}.",
        ]
    return lines


def mitigated(records: list[dict]) -> list[dict]:
    """Mitigated runs that learned the task and had an intruder to scale (without one, both adapters are the
    original)."""
    return [
        r
        for r in records
        if r.get("mitigation")
        and r["mitigation"][0]["intruder"]["directions"]
        and r["history"][-1]["task_acc"] >= LEARNED
    ]


def mitigation_table(records: list[dict]) -> list[str]:
    rows = mitigated(records)
    if not rows:
        return []
    lines = head(
        "Mitigation on the final adapters of runs that learned the task and have intruders (mean ± sd over seeds): "
        'the top intruder of each matrix scaled by λ (`scale_intruders`, which="top", ε = 0.5) against the whole '
        "adapter scaled by c to the same total update norm (Frobenius over all 210 layers):",
        [
            "configuration",
            "λ",
            "directions",
            "c",
            "forgetting: intruders scaled",
            "whole adapter",
            "task acc.: intruders scaled",
            "whole adapter",
        ],
    )
    for name, rs in by_config(rows).items():
        last = [r["history"][-1] for r in rs]
        lines.append(
            f"| {name} | 1 | - | 1 | {cell([p['forgetting'] for p in last], 3)} | same | "
            f"{cell([p['task_acc'] for p in last], 2)} | same |"
        )
        for i, lam in enumerate(m["lam"] for m in rs[0]["mitigation"]):
            ms = [r["mitigation"][i] for r in rs]
            lines.append(
                f"| {name} | {lam:g} | {cell([m['intruder']['directions'] for m in ms], 0)} | "
                f"{cell([m['norm_ratio'] for m in ms], 3)} | "
                + " | ".join(
                    cell([m[s][k] for m in ms], d)
                    for k, d in (("forgetting", 3), ("task_acc", 2))
                    for s in ("intruder", "control")
                )
                + " |"
            )
    return lines


def plot(records: list[dict], path: str) -> None:
    """Forgetting against each signal and the update norm (final points), and the mitigation trade-off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    colours = {"lora": "tab:blue", "rslora": "tab:orange", "full": "tab:green"}
    panels = (("intruders", "intruders (ε = 0.5)"), ("energy_share", "energy share"), ("sigma_ratio", "σ ratio"))
    panels += (("update_norm", "‖ΔW‖/‖W0‖"),)
    for ax, (key, label) in zip(axes.flat, panels, strict=False):
        for kind, colour in colours.items():
            pts = [(r["history"][-1][key], r["history"][-1]["forgetting"]) for r in records if r["kind"] == kind]
            if pts:
                ax.scatter(*zip(*pts, strict=True), c=colour, label=kind, s=25)
        ax.set(xlabel=label, ylabel="forgetting (ΔNLL per token)")
    axes.flat[0].legend()
    for ax, (name, rs) in zip(axes.flat[4:], by_config(mitigated(records)).items(), strict=False):
        for side, marker in (("intruder", "o-"), ("control", "s--")):
            xs = [statistics.fmean(r["history"][-1]["forgetting"] for r in rs)]
            ys = [statistics.fmean(r["history"][-1]["task_acc"] for r in rs)]
            for i in range(len(rs[0]["mitigation"])):
                xs.append(statistics.fmean(r["mitigation"][i][side]["forgetting"] for r in rs))
                ys.append(statistics.fmean(r["mitigation"][i][side]["task_acc"] for r in rs))
            ax.plot(xs, ys, marker, label="intruders scaled" if side == "intruder" else "whole adapter, same norm")
        ax.set(title=f"{name}: λ = 1 → 0", xlabel="forgetting (ΔNLL per token)", ylabel="task accuracy")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct: forgetting vs signals (final points), mitigation trade-off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def report(records: list[dict], plot_path: str | None = None) -> str:
    if not records:
        return "no runs"
    learned = [r for r in records if r["history"][-1]["task_acc"] >= LEARNED]
    lines = [f"seeds {sorted({r['seed'] for r in records})}, {len(records)} runs"]
    lines += outcome_table(records) + training_table(records)
    lines += across_table(records, "all runs") + across_table(learned, f"runs with final task accuracy ≥ {LEARNED}")
    lines += within_table(records) + mitigation_table(records)
    if plot_path:
        plot(records, plot_path)
        lines += ["", f"figure: {plot_path}"]
    return "\n".join(lines)
