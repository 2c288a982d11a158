"""Monitoring cost at real LLM shapes: a Llama-3-8B-shaped model (or the real SmolLM2-135M), LoRA on every linear
layer.

A model from ``transformers.LlamaConfig`` with Llama-3-8B's layer shapes (hidden 4096, intermediate 14336, 32 query
heads, 8 KV heads: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down 4096x14336) but only ``--layers``
decoder layers and a small vocabulary, bf16 weights, PEFT LoRA r=16 on q, k, v, o, gate, up and down. Through the
public ``SpectralMonitor`` API, one monitor per matrix kind (``include=``), it measures:

- the snapshot: seconds and bytes of stored basis (fp16) per matrix kind and per decoder layer;
- the measurement at step 0, every update still exactly zero (B = 0): reported from the snapshot, nothing solved;
- a first measurement of an already-trained adapter (cold), then, after every B drifted by ``--drift`` of its
  norm, a measurement in the steady state of training (warm): seconds per matrix kind and per layer;
- extrapolated to Llama-3-8B's 32 layers (224 matrices), with the projected training overhead of measuring every
  ``--every`` steps at ``--step-seconds`` per optimizer step.

The weights are HF's random init (normal, std 0.02): a Marchenko-Pastur spectrum with a crowded top edge, which
is harder for the solver than the heavy-tailed spectra of trained weights. Each adapter is "trained" by drawing
random factors whose update has singular values ``--update-scale`` x sigma_1(W0) / i, i = 1..16 (the low effective
rank of trained LoRA updates), so the merged top-10 mixes a few update directions with pretrained ones.

``--model smollm2`` measures the real SmolLM2-135M-Instruct instead (examples/smollm2_model.py: 30 layers, hidden
576, intermediate 1536, 9 query and 3 KV heads, float32, its trained weights), with the same adapters, and prints
the totals over its 210 matrices instead of the extrapolation.

The default step time, 3 s, is a Llama-3-8B LoRA step on one H100: 16 sequences x 2048 tokens per optimizer step,
~4 x 8e9 FLOP per token (forward plus activation gradients; frozen weights need no weight gradients) = 1.0e15 FLOP,
at ~400 TFLOP/s (40% of bf16 peak) = 2.6 s, plus gradient checkpointing's recomputed forward ~ 3 s.

    python benchmarks/bench_llama.py --threads 2                 # one layer on CPU, ~5-10 min
    python benchmarks/bench_llama.py --layers 2 --device cuda    # on a GPU
    python benchmarks/bench_llama.py --model smollm2 --threads 2 # SmolLM2-135M, all 210 matrices, ~1 min
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch

from lora_spectral_callback import SpectralMonitor

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LLAMA3_8B_LAYERS = 32
RANK = 16


def llama_lora(layers: int, device: str, seed: int):
    """Llama-3-8B-shaped decoder layers (bf16, small vocabulary) with LoRA r=16 on every linear layer."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=layers,
        vocab_size=1024,
        max_position_embeddings=2048,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=torch.bfloat16)  # type: ignore[call-arg]
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(KINDS), lora_dropout=0.0)
    return get_peft_model(model, lora)


def smollm2_lora(device: str):
    """The real SmolLM2-135M-Instruct with the example's LoRA (r=16 on the same seven kinds)."""
    from peft import get_peft_model

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
    import sft_smollm2 as sft

    model = sft.load_model(str(sft.smollm2_path())).to(device)
    return get_peft_model(model, sft.lora_config(RANK))


def lora_layers(model) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def kind_of(name: str) -> str:
    return next(k for k in KINDS if name.endswith(k))


def top_singular_value(W: torch.Tensor, steps: int = 30) -> float:
    """Largest singular value by power iteration on W^T W (a few matrix-vector products)."""
    W = W.float()
    x = torch.randn(W.shape[1], 1, generator=torch.Generator().manual_seed(0)).to(W.device)
    for _ in range(steps):
        x = W.T @ (W @ x)
        x = x / x.norm()
    return float((W @ x).norm())


@torch.no_grad()
def train_adapters(model, scale: float, seed: int) -> None:
    """Random factors whose update ``s B A`` has singular values ``scale * sigma_1(W0) / i`` (i = 1..r): a few
    dominant directions, like the low effective rank of trained LoRA updates."""
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        Qa = torch.linalg.qr(torch.randn(A.shape[1], RANK, generator=g)).Q
        Qb = torch.linalg.qr(torch.randn(B.shape[0], RANK, generator=g)).Q
        sigma = scale * top_singular_value(layer.get_base_layer().weight) / torch.arange(1, RANK + 1)
        A.copy_(Qa.T.to(A.device, A.dtype) / A.shape[1] ** 0.5)  # rows of PEFT's init size
        B.copy_((Qb * sigma * A.shape[1] ** 0.5 / layer.scaling["default"]).to(B.device, B.dtype))


@torch.no_grad()
def drift(model, amount: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        B = layer.lora_B["default"].weight
        G = torch.randn(B.shape, generator=g).to(B.device, B.dtype)
        B.add_(amount * B.norm() * G / G.norm())


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llama", "smollm2"], default="llama")
    parser.add_argument("--layers", type=int, default=1, help="decoder layers to build (Llama-3-8B has 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--basis-device", default=None, help="where bases are kept (default: --device)")
    parser.add_argument("--drift", type=float, default=0.05, help="change of each B, relative to its norm")
    parser.add_argument("--update-scale", type=float, default=1.0, help="top singular value of B A / of W0")
    parser.add_argument("--every", type=int, default=50, help="every_n_steps of the projection")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="training step time of the projection")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} CPU threads"
    print("$ python " + " ".join(sys.argv))
    if args.model == "smollm2":
        model = smollm2_lora(args.device)
        args.layers = model.config.num_hidden_layers
        what = f"SmolLM2-135M-Instruct ({args.layers} layers)"
    else:
        model = llama_lora(args.layers, args.device, args.seed)
        what = f"{args.layers} Llama-3-8B-shaped layer(s)"
    print(f"torch {torch.__version__}, {where}, {what}, LoRA r={RANK}", flush=True)
    options = {"epsilon": [0.3, 0.5, 0.7], "progress": False, "basis_device": args.basis_device or args.device}
    monitors = {kind: SpectralMonitor(model, include=rf"\.{kind}$", **options) for kind in KINDS}
    shapes = {kind_of(name): tuple(layer.get_base_layer().weight.shape) for name, layer in lora_layers(model).items()}
    rows: dict[str, dict] = {}
    for kind, monitor in monitors.items():
        seconds = timed(monitor.snapshot)
        shape = shapes[kind]
        rows[kind] = {"shape": shape, "snapshot_s": seconds / args.layers, "bytes": monitor.basis_bytes() / args.layers}
        print(f"snapshot {kind} {shape}: {rows[kind]['snapshot_s']:.1f} s per matrix", flush=True)

    step0 = sum(timed(lambda m=monitor: m.measure(0)) for monitor in monitors.values())
    print(f"measured step 0 (B = 0): {step0:.2f} s for {args.layers} layer(s)", flush=True)
    for monitor in monitors.values():  # what follows is a first measurement of a trained adapter
        for state in monitor.snapshots.layers.values():
            state.warm_start = None
    train_adapters(model, args.update_scale, args.seed + 1)
    for phase in ("cold", "warm"):
        if phase == "warm":
            drift(model, args.drift, args.seed + 2)
        for kind, monitor in monitors.items():
            report = monitor.measure(1 if phase == "warm" else 0)
            assert report is not None and report.errors == {}, report
            layers = list(report.layers.values())
            rows[kind][f"{phase}_s"] = sum(layer.seconds for layer in layers) / args.layers
            rows[kind][f"{phase}_steps"] = max(layer.iterations for layer in layers)
            rows[kind][f"{phase}_converged"] = all(layer.converged for layer in layers)
            rows[kind][f"{phase}_resolved"] = sum(layer.resolved for layer in layers)  # decisions the float64 pass took
            rows[kind][f"{phase}_counts"] = "/".join(str(v) for v in report.intruders_total_by_epsilon.values())
        print(f"measured {phase}", flush=True)

    print()
    print(
        "| matrix | shape (out x in) | snapshot s | basis MiB (fp16) | cold s | warm s | steps cold/warm "
        "| float64-resolved cold/warm | intruders 0.3/0.5/0.7 (warm) |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|---|")
    total = {"snapshot_s": 0.0, "bytes": 0.0, "cold_s": 0.0, "warm_s": 0.0}
    for kind, r in rows.items():
        for key in total:
            total[key] += r[key]
        ok = "" if r["cold_converged"] and r["warm_converged"] else " (not converged)"
        print(
            f"| {kind} | {r['shape'][0]}x{r['shape'][1]} | {r['snapshot_s']:.1f} | {r['bytes'] / 2**20:.0f} "
            f"| {r['cold_s']:.2f} | {r['warm_s']:.2f} | {r['cold_steps']}/{r['warm_steps']}{ok} "
            f"| {r['cold_resolved']}/{r['warm_resolved']} | {r['warm_counts']} |"
        )
    print(
        f"| **one layer** | | **{total['snapshot_s']:.1f}** | **{total['bytes'] / 2**20:.0f}** "
        f"| **{total['cold_s']:.2f}** | **{total['warm_s']:.2f}** | | | |"
    )
    if args.model == "smollm2":
        n = args.layers
        print(f"\nAll {n} layers ({n * len(KINDS)} matrices): snapshot {n * total['snapshot_s']:.1f} s, ", end="")
        print(f"measurement cold {n * total['cold_s']:.2f} s, warm {n * total['warm_s']:.2f} s")
        return
    n = LLAMA3_8B_LAYERS
    per_measure = n * total["warm_s"]
    overhead = per_measure / (args.every * args.step_seconds)
    print()
    print(f"Extrapolated to Llama-3-8B ({n} layers, {n * len(KINDS)} matrices), on this device:")
    print(f"- snapshot: {n * total['snapshot_s'] / 60:.1f} min, {n * total['bytes'] / 2**30:.1f} GiB of fp16 bases")
    print(f"- first measurement of a trained adapter (cold): {n * total['cold_s']:.1f} s")
    print(f"- measurement in training (warm, after a {args.drift:.0%} drift of B): {per_measure:.1f} s")
    print(
        f"- overhead at every_n_steps={args.every} and {args.step_seconds:g} s per step: {overhead:.1%} "
        f"({per_measure:.1f} s every {args.every * args.step_seconds:g} s)"
    )


if __name__ == "__main__":
    main()
