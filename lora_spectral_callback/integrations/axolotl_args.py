"""The YAML keys of the axolotl plugin: ``spectral_<option>`` for each :class:`LoRASpectralCallback` option.

axolotl merges this pydantic model into its config schema (``SpectralPlugin.get_input_args`` names it), so the
keys are type-checked with the rest of the YAML; a key left out (``None``) keeps the callback's default. axolotl
drops keys its schema does not know, hence one field per option here. Imported only by axolotl (needs pydantic).
"""

from __future__ import annotations

from pydantic import BaseModel


class SpectralArgs(BaseModel):
    """``spectral_*`` keys; see :class:`~lora_spectral_callback.LoRASpectralCallback` for their meaning."""

    spectral_every_n_steps: int | None = None
    spectral_top_k: int | None = None
    spectral_epsilon: float | list[float] | None = None
    spectral_max_intruders: int | None = None
    spectral_max_intruders_per_layer: int | None = None
    spectral_patience: int | None = None
    spectral_max_intruder_energy_share: float | None = None
    spectral_max_intruder_sigma_ratio: float | None = None
    spectral_stop_training: bool | None = None
    spectral_stop_on_nonfinite: bool | None = None
    spectral_log_dir: str | None = None
    spectral_asynchronous: bool | None = None
    spectral_image_every_n_measurements: int | None = None
    spectral_image_layers: int | None = None
    spectral_include: str | None = None
    spectral_exclude: str | None = None
    spectral_mode: str | None = None
    spectral_basis_dtype: str | None = None
    spectral_basis_device: str | None = None
    spectral_basis_cache_dir: str | None = None
    spectral_snapshot: str | None = None
    spectral_progress: bool | None = None
    spectral_strict: bool | None = None
