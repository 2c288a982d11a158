"""benchmarks/llm_forgetting.py --quick end to end on the real SmolLM2-135M-Instruct (slow: about a minute on one
thread): the records it writes carry every signal, both outcomes and the mitigation against its control."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.mark.slow
def test_quick_mode_records_signals_outcomes_and_mitigation(tmp_path):
    from smollm2_model import smollm2_path

    try:
        smollm2_path()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be obtained: {e}")
    results = tmp_path / "quick.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "llm_forgetting.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--results", str(results)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (record,) = json.loads(results.read_text())
    assert [p["step"] for p in record["history"]] == [2, 4]
    for p in record["history"]:
        assert {"intruders", "energy_share", "sigma_ratio", "first", "update_norm", "task_acc"} <= set(p)
        assert math.isfinite(p["forgetting"]) and p["update_norm"] > 0
    (row,) = record["mitigation"]
    assert row["lam"] == 0.5 and row["norm_ratio"] == row["control"]["c"] > 0
    if row["intruder"]["directions"] == 0:  # nothing to scale after 4 steps: both adapters are the original
        assert row["intruder"]["forgetting"] == row["control"]["forgetting"] == record["history"][-1]["forgetting"]
    assert "Across runs" in out.stdout and "Within runs" in out.stdout
