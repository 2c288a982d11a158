"""axolotl plugin: ``plugins: [lora_spectral_callback.integrations.axolotl.SpectralPlugin]`` in the YAML.

axolotl's ``load_plugin`` imports this module and instantiates the class; its ``PluginManager`` then asks every
plugin for input arguments (:mod:`.axolotl_args`: the ``spectral_*`` YAML keys) and, before building the Trainer,
for callbacks: here one :class:`LoRASpectralCallback` configured from those keys. The module imports without
axolotl (the class then derives from ``object``: nothing calls the other hooks without axolotl's manager), so
the plugin can be tested and documented anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:
    from axolotl.integrations.base import BasePlugin
except ImportError:  # no axolotl: the plugin is still importable; only axolotl calls the hooks it inherits
    BasePlugin = object

__all__ = ["PREFIX", "SpectralPlugin", "callback_options"]

PREFIX = "spectral_"


def callback_options(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The callback's keyword arguments from the config's ``spectral_*`` keys (unset ones keep the defaults)."""
    return {
        key.removeprefix(PREFIX): value for key, value in cfg.items() if key.startswith(PREFIX) and value is not None
    }


class SpectralPlugin(BasePlugin):
    """Adds a :class:`LoRASpectralCallback` to axolotl's Trainer, configured by the ``spectral_*`` YAML keys."""

    def get_input_args(self) -> str:
        return "lora_spectral_callback.integrations.axolotl_args.SpectralArgs"

    def add_callbacks_pre_trainer(self, cfg: Mapping[str, Any], model: Any) -> list[Any]:
        from lora_spectral_callback import LoRASpectralCallback

        return [LoRASpectralCallback(**callback_options(cfg))]
