"""The axolotl plugin: the example YAML read as axolotl reads it, the callback it adds trained in a Trainer (counts
against a float64 recount), and, where axolotl is installed, axolotl's own PluginManager and config validation.

axolotl 0.21.0 needs Python >= 3.12 and pins transformers 5.20.1 / trl 1.14.1 / CUDA-only kernels, so it never
shares our test environment; the axolotl-side test runs in a separate one (docs/integrations.md) and skips here."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from integration_helpers import assert_counts_match
from training import lora_bert, make_trainer

from lora_spectral_callback import LoRASpectralCallback, SpectralConfig
from lora_spectral_callback.integrations.axolotl import SpectralPlugin, callback_options

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "axolotl" / "lora_spectral.yml"
PLUGIN = "lora_spectral_callback.integrations.axolotl.SpectralPlugin"


def example_config(tmp_path) -> dict:
    """The example YAML, measuring every 2 steps into ``tmp_path`` so that a 4-step run covers the schedule."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    assert cfg["plugins"] == [PLUGIN]
    return {**cfg, "spectral_every_n_steps": 2, "spectral_log_dir": str(tmp_path / "tb"), "spectral_progress": False}


def test_yaml_keys_name_callback_options():
    """Every YAML key is an option of the callback or of SpectralConfig (a misspelt field would be ignored)."""
    args = pytest.importorskip("lora_spectral_callback.integrations.axolotl_args", reason="pydantic is not installed")
    options = set(inspect.signature(LoRASpectralCallback).parameters) | {
        f.name for f in dataclasses.fields(SpectralConfig)
    }
    fields = set(args.SpectralArgs.model_fields)
    assert all(f.startswith("spectral_") for f in fields)
    assert {f.removeprefix("spectral_") for f in fields} <= options


def test_example_yaml_adds_a_configured_callback(tmp_path):
    pytest.importorskip("pydantic", reason="pydantic is not installed")
    cfg = example_config(tmp_path)
    module, name = cfg["plugins"][0].rsplit(".", 1)  # what axolotl's load_plugin does
    plugin = getattr(importlib.import_module(module), name)()
    assert isinstance(plugin, SpectralPlugin)
    args = importlib.import_module(plugin.get_input_args().rsplit(".", 1)[0]).SpectralArgs
    checked = args(**{k: v for k, v in cfg.items() if k.startswith("spectral_")})  # axolotl's validation
    callbacks = plugin.add_callbacks_pre_trainer(checked.model_dump(exclude_none=True), model=None)
    (callback,) = callbacks
    assert callback.every_n_steps == 2 and callback.config.epsilons == (0.5, 0.7)
    assert callback.threshold.max_intruders == 200 and callback.threshold.patience == 2
    model = lora_bert(random_update=False)
    trainer = make_trainer(tmp_path / "run", model, callbacks, max_steps=4, learning_rate=5e-2)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "spectral/intruders_total" in h] == [0, 2, 4]
    assert callback.last_report.intruders_total > 0
    assert_counts_match(callback.last_report, model, [0.5, 0.7])


def test_unset_keys_keep_the_callback_defaults():
    assert callback_options({"spectral_top_k": 5, "spectral_patience": None, "lora_r": 8}) == {"top_k": 5}


def test_axolotl_plugin_manager_and_config_validation(tmp_path):
    base = pytest.importorskip(
        "axolotl.integrations.base", reason="axolotl is not installed (needs Python >= 3.12 and its own pins)"
    )
    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    manager = base.PluginManager.get_instance()
    manager.register(PLUGIN, required=True)
    assert isinstance(manager.plugins[PLUGIN], base.BasePlugin)
    cfg = validate_config(DictDefault(example_config(tmp_path)))  # merges SpectralArgs into axolotl's schema
    assert cfg.spectral_every_n_steps == 2 and cfg.spectral_epsilon == [0.5, 0.7]
    with pytest.raises(ValueError, match="spectral_every_n_steps"):
        validate_config(DictDefault({**example_config(tmp_path), "spectral_every_n_steps": "often"}))
    model = lora_bert(random_update=False)
    callbacks = manager.add_callbacks_pre_trainer(cfg, model)
    (callback,) = [c for c in callbacks if isinstance(c, LoRASpectralCallback)]
    make_trainer(tmp_path / "run", model, [callback], max_steps=4, learning_rate=5e-2).train()
    assert callback.last_report.step == 4
    assert_counts_match(callback.last_report, model, [0.5, 0.7])
