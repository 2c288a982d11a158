"""A run resumed from a checkpoint continues the TensorBoard series without duplicate or backwards steps, keeps the
alert patience, and measures against the original pretrained weights."""

from __future__ import annotations

import copy
import glob
import time

import pytest
from helpers import reference_counts
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch import Tensor
from training import lora_bert, make_trainer, tensorboard_scalars

from lora_spectral_callback import LoRASpectralCallback

TAG = "spectral/intruders_total"


def base_weights(model) -> dict[str, Tensor]:
    """Pretrained weights by readable layer name, copied from a model that has not trained."""
    return {
        name.removeprefix("base_model.model."): module.get_base_layer().weight.detach().clone()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
    }


def merged_weights(model, names) -> dict[str, Tensor]:
    """Independent reference: PEFT's own merge of the adapters into the base weights."""
    merged = copy.deepcopy(model).merge_and_unload()
    return {name: merged.get_submodule(name).weight.detach() for name in names}


def raw_steps(log_dir, tag: str) -> list[int]:
    """Steps of ``tag`` as written in all event files, without TensorBoard's purge applied."""
    steps = []
    for path in sorted(glob.glob(f"{log_dir}/events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def train(tmp_path, resume=None, restore_states=False, max_steps=8, save_steps=4, **options):
    """A fresh model and callback (as in a new process), optionally resuming from a checkpoint."""
    callback = LoRASpectralCallback(log_dir=str(tmp_path / "tb"), progress=False, **options)
    trainer = make_trainer(
        tmp_path / "out",
        lora_bert(),
        [callback],
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=save_steps,
        restore_callback_states_from_checkpoint=restore_states,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


@pytest.mark.parametrize("restore_states", [False, True], ids=["plain", "restore_callback_states"])
def test_resume_continues_series_against_original_weights(tmp_path, restore_states):
    original = base_weights(lora_bert())
    _first, _ = train(tmp_path, every_n_steps=2)  # measures 0, 2, 4, 6, 8; checkpoint at 4 and 8
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tb", TAG)] == [0, 2, 4, 6, 8]
    time.sleep(1.1)  # event file names carry the time in seconds: keep the resumed run's file sorted after
    second, callback = train(
        tmp_path, resume=str(tmp_path / "out" / "checkpoint-4"), restore_states=restore_states, every_n_steps=2
    )
    assert second.state.global_step == 8

    # Both runs wrote 6 and 8; the resumed run's writer purges the first run's events from step 5 on.
    assert sorted(raw_steps(tmp_path / "tb", TAG)) == [0, 2, 4, 6, 6, 8, 8]
    series = tensorboard_scalars(tmp_path / "tb", TAG)
    steps = [s for s, _ in series]
    assert steps == sorted(set(steps)) == [0, 2, 4, 6, 8]
    resumed = {e["step"]: e[TAG] for e in second.state.log_history if TAG in e}
    assert sorted(resumed) == [0, 2, 4, 6, 8]  # 0-4 restored from the checkpoint's history, 6 and 8 measured now
    assert dict(series)[6] == resumed[6] and dict(series)[8] == resumed[8]

    # Counts after resuming equal a float64 full-SVD recount against the ORIGINAL pretrained weights.
    totals, per_layer = reference_counts(original, merged_weights(second.model, original), [0.5])
    report = callback.last_report
    assert report.step == 8 and not report.errors
    assert {name: layer.intruders for name, layer in report.layers.items()} == per_layer
    assert report.intruders_total == totals[0.5] > 0


@pytest.mark.parametrize("restore_states", [False, True], ids=["plain", "restore_callback_states"])
def test_resume_keeps_alert_patience(tmp_path, restore_states):
    """patience=2 split across the resume: one exceeded measurement before the checkpoint, one after."""
    options = dict(every_n_steps=4, max_intruders=0, patience=2, save_steps=2)
    first, callback = train(tmp_path, **options)  # step 0: wait 1; step 4: wait 2 -> alert, stop
    assert first.state.global_step == 4 and callback.last_alert.step == 4

    alerts = []
    second, callback = train(
        tmp_path,
        resume=str(tmp_path / "out" / "checkpoint-2"),
        restore_states=restore_states,
        on_alert=alerts.append,
        **options,
    )
    # the resumed run measured once (step 4): without the restored wait=1 it could not have alerted
    assert [r.step for r in alerts] == [4] and callback.last_alert.step == 4
    assert second.state.global_step == 4
    waits = [(e["step"], e["spectral/alert_wait"]) for e in second.state.log_history if TAG in e]
    assert waits == [(0, 1), (4, 2)]


def pissa_bert():
    """Tiny BERT with PiSSA on query/value: PEFT rewrites each base weight to W0 - s B0 A0."""
    from helpers import tiny_bert
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS", init_lora_weights="pissa"
    )
    return get_peft_model(tiny_bert(hidden=32, layers=2, seed=0), config)


def test_resumed_pissa_run_measures_against_the_original_weights(tmp_path):
    """The resumed model shows only W_res and trained factors; the initial factors saved by the first run rebuild
    the true pretrained reference, checked against a float64 recount with the original weights kept aside."""
    from helpers import tiny_bert

    plain = tiny_bert(hidden=32, layers=2, seed=0)  # the same weights pissa_bert starts from, before PiSSA
    original = {n: m.weight.detach().clone() for n, m in plain.named_modules() if n.endswith(("query", "value"))}

    def run(resume=None):
        callback = LoRASpectralCallback(
            every_n_steps=2, epsilon=[0.5, 0.7], log_dir=str(tmp_path / "tb"), progress=False
        )
        trainer = make_trainer(
            tmp_path / "out",
            pissa_bert(),
            [callback],
            max_steps=8,
            save_strategy="steps",
            save_steps=4,
            learning_rate=2e-2,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback

    run()
    assert (tmp_path / "out" / "spectral_baseline.safetensors").exists()
    second, callback = run(str(tmp_path / "out" / "checkpoint-4"))
    report = callback.last_report
    assert report.step == 8 and report.errors == {}
    totals, per_layer = reference_counts(original, merged_weights(second.model, original), [0.5, 0.7])
    assert {name: layer.intruders for name, layer in report.layers.items()} == per_layer
    assert {float(e): n for e, n in report.intruders_total_by_epsilon.items()} == totals and totals[0.7] > 0
