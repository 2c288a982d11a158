"""Live intruder-dimension monitoring for LoRA fine-tunes (Shuttleworth et al. 2024, arXiv 2410.21228)."""

from .monitor import SpectralConfig, SpectralMonitor
from .report import LayerReport, SpectralReport

__all__ = ["LoRASpectralCallback", "SpectralConfig", "SpectralMonitor", "SpectralReport", "LayerReport"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports transformers; keep `import lora_spectral_callback` light for custom loops.
    if name == "LoRASpectralCallback":
        from .callback import LoRASpectralCallback

        return LoRASpectralCallback
    raise AttributeError(name)
