"""Starting the 2-process tests' scripts: one launcher command, one environment, one timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]


def launch(
    script: Path, *args: str, launcher: list[str] = TORCHRUN, timeout: float = 400, **env: str
) -> subprocess.CompletedProcess:
    """Run ``script args`` as 2 processes under ``launcher`` (torchrun by default), one thread each, with the repo
    root prepended to PYTHONPATH and ``env`` added to the environment; output captured. A hang fails after
    ``timeout`` seconds (subprocess.TimeoutExpired) instead of blocking the suite."""
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        OMP_NUM_THREADS="1",
        **env,
    )
    command = [*launcher, str(script), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
