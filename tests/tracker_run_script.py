"""One short Trainer run with the spectral callback and ``report_to=trackers``, in a process of its own.

Run by ``test_integration_trackers.py``: a fresh process gives each tracker a clean global state (wandb's service,
trackio's directory read at import, MLflow's active run) and flushes it at exit, as a user's run would. With
``--no-tensorboard`` the ``tensorboard`` package cannot be imported, as if it were not installed. Writes
``result.json`` (the last report's counts beside a float64 recount) into the output directory.

Usage: python tracker_run_script.py TRACKER[,TRACKER...] OUT_DIR [--no-tensorboard]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if "--no-tensorboard" in sys.argv:
    sys.modules["tensorboard"] = None  # type: ignore[assignment]  # `import tensorboard` raises ImportError

sys.path.insert(0, str(Path(__file__).parent))
from integration_helpers import recount_peft
from training import lora_bert, make_trainer

from lora_spectral_callback import LoRASpectralCallback

EPS = [0.5, 0.7]


def main(trackers: list[str], out: Path) -> None:
    callback = LoRASpectralCallback(every_n_steps=2, epsilon=EPS, log_dir=str(out / "tb"), progress=False)
    trainer = make_trainer(
        out / "run",
        lora_bert(random_update=False),
        [callback],
        max_steps=4,
        learning_rate=5e-2,
        report_to=trackers,
        run_name="spectral",
    )
    trainer.train()
    report = callback.last_report
    totals, per_layer = recount_peft(trainer.model, list(report.layers), EPS)
    result = {
        "history": [h for h in trainer.state.log_history if "spectral/intruders_total" in h],
        "counts": {n: r.intruders for n, r in report.layers.items()},
        "reference_counts": per_layer,
        "totals": report.intruders_total_by_epsilon,
        "reference_totals": {f"{e:g}": totals[e] for e in EPS},
    }
    (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1].split(","), Path(sys.argv[2]))
