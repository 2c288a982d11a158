"""The monitor split across the ranks of a sharded (FSDP2) LoRA fine-tune: per-rank bases, snapshot and wall time at
world 1 / 2 / 4, and the counts against a float64 recount of the unsharded weights.

A Llama-shaped model from ``transformers.LlamaConfig`` (hidden 1024, intermediate 2816, 16 query and 4 KV heads: GQA,
``--layers`` decoder layers, float32), PEFT LoRA r=16 on q, k, v, o, gate, up and down, every decoder layer and the
model wrapped with ``fully_shard`` on gloo CPU processes, one intra-op thread each. Each rank:

1. sets the adapters to a trained-looking update (``bench_llama.train_adapters``, before sharding, the same on every
   rank) and builds ``SpectralMonitor`` on the sharded model;
2. measures once (cold: every rank gathers every matrix, in rounds, and snapshots and measures its own share);
3. drifts every B by ``--drift`` of its norm and measures again (warm);
4. reports its basis bytes, the seconds its snapshots took, and the wall time of both measurements; rank 0 recounts
   the intruders of every matrix from a float64 full SVD of the gathered weights.

``--worlds 1 2 4`` runs each world size in turn under ``torchrun --standalone`` and prints the table;
``--nnodes 2`` runs world 2 as two single-process "nodes" rendezvousing on this machine (``torchrun --nnodes 2``
with a local c10d endpoint), the multi-node path::

    python benchmarks/bench_sharded.py --worlds 1 2 4 --layers 2 --epsilons 0.5
    python benchmarks/bench_sharded.py --worlds 1 2 4 --layers 2      # epsilon 0.3 / 0.5 / 0.7
    python benchmarks/bench_sharded.py --nnodes 2 --layers 1 --hidden 256

The table also gives the warm measurement's slowest matrix and its float64 passes (a decision closer to a threshold
than fp32 can place, :func:`lora_spectral_callback.measure.decompose`): one matrix's pass is not divided by the split.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def llama_lora(layers: int, hidden: int, seed: int):
    """Llama-shaped decoder layers (GQA 4:1, intermediate 2.75x hidden, float32) with LoRA r=16 on all seven kinds."""
    from bench_llama import KINDS, RANK
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = max(hidden // 64, 4)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_attention_heads=heads,
        num_key_value_heads=heads // 4,
        num_hidden_layers=layers,
        vocab_size=256,
    )
    model = LlamaForCausalLM(config)  # type: ignore[call-arg]
    return get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(KINDS)))


@torch.no_grad()
def drift_sharded(model, amount: float, seed: int) -> None:
    """``bench_llama.drift`` for ``DTensor`` factors: each B moved by ``amount`` of its norm, the same on every rank."""
    from bench_llama import lora_layers
    from torch.distributed.tensor import distribute_tensor

    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        B = layer.lora_B["default"].weight
        whole = B.full_tensor()
        G = torch.randn(whole.shape, generator=g)
        B.copy_(distribute_tensor(whole + amount * whole.norm() * G / G.norm(), B.device_mesh, B.placements))


@torch.no_grad()
def float64_counts(model, epsilons: list[float]) -> dict[str, list[int]]:
    """Intruders of every LoRA matrix at ``epsilons`` from float64 full SVDs of the gathered base weight and merged
    weight (the paper's Alg. 1, independent of the monitor). A collective: every rank gathers, rank 0 computes."""
    from bench_llama import lora_layers

    counts = {}
    for name, layer in lora_layers(model).items():
        W0, A, B = (
            p.full_tensor().double()
            for p in (layer.get_base_layer().weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
        )
        if torch.distributed.get_rank() != 0:
            continue
        U0 = torch.linalg.svd(W0, full_matrices=False).U
        U = torch.linalg.svd(W0 + layer.scaling["default"] * B @ A, full_matrices=False).U[:, :10]
        max_cos = (U0.T @ U).abs().max(dim=0).values
        counts[name.removeprefix("base_model.model.")] = [int((max_cos < eps).sum()) for eps in epsilons]
    return counts


def run_rank(args: argparse.Namespace) -> None:
    """One rank's part (under torchrun): shard, measure cold and warm, write ``rank<N>.json`` to ``args.out``."""
    from bench_llama import train_adapters
    from torch.distributed.fsdp import fully_shard

    from lora_spectral_callback import SpectralMonitor

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    model = llama_lora(args.layers, args.hidden, args.seed)
    train_adapters(model, 1.0, args.seed + 1)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    monitor = SpectralMonitor(model, epsilon=args.epsilons, progress=False)
    snapshot_seconds = 0.0
    take = monitor.snapshots.take

    def timed_take(matrix):
        nonlocal snapshot_seconds
        start = time.perf_counter()
        take(matrix)
        snapshot_seconds += time.perf_counter() - start

    monitor.snapshots.take = timed_take  # type: ignore[method-assign]
    walls, reports = [], []
    for step in (0, 1):
        if step:
            drift_sharded(model, args.drift, args.seed + 2)
        torch.distributed.barrier()
        start = time.perf_counter()
        reports.append(monitor.measure(step))
        walls.append(time.perf_counter() - start)
    result = {
        "rank": rank,
        "world": world,
        "node": os.environ.get("GROUP_RANK", "0"),
        "matrices": len(monitor.matrices),
        "snapshots": monitor.snapshots.store.computed,
        "basis_bytes": monitor.basis_bytes(),
        "snapshot_s": snapshot_seconds,
        "cold_wall_s": walls[0],
        "warm_wall_s": walls[1],
    }
    reference = float64_counts(model, args.epsilons)
    if rank == 0:
        report = reports[1]
        assert report is not None
        result["errors"] = report.errors
        result["counts"] = {
            name: [layer.intruders_by_epsilon[k] for k in layer.intruders_by_epsilon]
            for name, layer in report.layers.items()
        }
        result["reference"] = reference
        result["uncertain"] = report.uncertain
        result["resolved"] = report.resolved
        owned = [
            [m.name for m, o in zip(monitor.matrices, monitor.owners, strict=True) if o == r] for r in range(world)
        ]
        result["slowest_warm_s"] = max(layer.seconds for layer in report.layers.values())
        result["warm_compute_s"] = [sum(report.layers[name].seconds for name in names) for names in owned]
    (Path(args.rank_out) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, nnodes: int, args: argparse.Namespace, out: str) -> list[dict]:
    """Run ``world`` ranks (on ``nnodes`` "nodes" of this machine) and return their results, in rank order."""
    rank_args = [str(HERE / "bench_sharded.py"), "--rank-out", out, "--layers", str(args.layers)]
    rank_args += ["--hidden", str(args.hidden), "--drift", str(args.drift), "--seed", str(args.seed)]
    rank_args += ["--epsilons", *map(str, args.epsilons)]
    run = [sys.executable, "-m", "torch.distributed.run"]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]),
    )
    if nnodes == 1:
        subprocess.run([*run, "--standalone", f"--nproc-per-node={world}", *rank_args], env=env, check=True)
    else:
        rendezvous = ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", "--rdzv-id=bench-sharded"]
        per_node = [f"--nnodes={nnodes}", f"--nproc-per-node={world // nnodes}"]
        nodes = [subprocess.Popen([*run, *per_node, *rendezvous, *rank_args], env=env) for _ in range(nnodes)]
        if any(node.wait(timeout=600) for node in nodes):
            raise RuntimeError("a node failed")
    return [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--nnodes", type=int, default=1, help="run world 2 as this many nodes on this machine")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--drift", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--rank-out", help=argparse.SUPPRESS)  # set by launch(): run one rank
    parser.add_argument("--json", help="write every rank's results here")
    args = parser.parse_args()
    if args.rank_out:
        run_rank(args)
        return
    print("$ python " + " ".join(sys.argv), flush=True)
    worlds = [2] if args.nnodes > 1 else args.worlds
    rows = {}
    for world in worlds:
        with tempfile.TemporaryDirectory() as out:
            rows[world] = launch(world, args.nnodes, args, out)
    print(f"\ntorch {torch.__version__}, gloo, 1 thread per rank, {os.cpu_count()} CPUs, {args.layers} layer(s) hidden")
    print(
        f"{args.hidden}, LoRA r=16 on 7 kinds ({rows[worlds[0]][0]['matrices']} matrices), drift {args.drift:.0%}, epsilon {args.epsilons}\n"
    )
    print(
        "| world | nodes | snapshots per rank | basis MiB per rank (max) | snapshot s per rank (max) "
        "| cold wall s | warm wall s | warm compute s per rank (max) | slowest matrix s (warm) | float64 passes (warm) "
        "| counts = float64 recount |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    one = rows[worlds[0]]
    for world, ranks in rows.items():
        main_rank = ranks[0]
        exact = main_rank["counts"] == main_rank["reference"] and not main_rank["errors"]
        print(
            f"| {world} | {len({r['node'] for r in ranks})} | {'/'.join(str(r['snapshots']) for r in ranks)} "
            f"| {max(r['basis_bytes'] for r in ranks) / 2**20:.1f} | {max(r['snapshot_s'] for r in ranks):.1f} "
            f"| {main_rank['cold_wall_s']:.2f} | {main_rank['warm_wall_s']:.2f} | {max(main_rank['warm_compute_s']):.2f} "
            f"| {main_rank['slowest_warm_s']:.2f} | {main_rank['resolved']} | {'yes' if exact else 'NO'} |"
        )
    if 1 in rows and len(rows) > 1:
        for world, ranks in rows.items():
            ratio = max(r["basis_bytes"] for r in ranks) / one[0]["basis_bytes"]
            print(
                f"world {world}: largest per-rank basis {ratio:.2f}x one process's, "
                f"warm wall {ranks[0]['warm_wall_s'] / one[0]['warm_wall_s']:.2f}x"
            )
    if args.json:
        Path(args.json).write_text(json.dumps({str(w): r for w, r in rows.items()}, indent=1))
    if not all(r[0]["counts"] == r[0]["reference"] and not r[0]["errors"] for r in rows.values()):
        sys.exit("counts differ from the float64 recount")


if __name__ == "__main__":
    main()
