"""Adapters for the frameworks people already train with, on top of the public API.

- :mod:`.schedule`: :class:`~.schedule.SpectralSchedule`, the measure-every-N-steps-and-decide core any loop can
  drive (no framework import).
- :mod:`.lightning`: a PyTorch Lightning ``Callback`` and the same for Fabric (needs ``lightning``).
- :mod:`.axolotl`: an axolotl plugin (``plugins: [lora_spectral_callback.integrations.axolotl.SpectralPlugin]``);
  importable without axolotl.

Each module imports its framework only when it is itself imported, so importing this package costs nothing.
"""
