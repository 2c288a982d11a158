"""Live intruder-dimension monitoring for LoRA fine-tunes (Shuttleworth et al. 2024, arXiv 2410.21228).

The public API, by layer: :class:`SpectralMonitor` (+ :class:`SpectralConfig`) measures a model on demand in any
training loop and returns :class:`SpectralReport` objects; :class:`IntruderThreshold` decides when to alert;
:class:`TensorBoardWriter` (or any :class:`MetricWriter`) records reports; :class:`LoRASpectralCallback` wires all
of it into a transformers ``Trainer``. :class:`ForgettingProxy` and :func:`scale_intruders` are the paper's
forgetting measurement stand-in and its post-hoc mitigation.
"""

from .alerts import Alert, IntruderThreshold
from .config import SpectralConfig
from .forgetting import ForgettingProxy
from .matrix import WeightMatrix
from .mitigation import MitigationResult, scale_intruders
from .monitor import SpectralMonitor
from .report import LayerReport, SpectralReport
from .writers import MetricWriter, TensorBoardWriter

__all__ = [
    "Alert",
    "ForgettingProxy",
    "IntruderThreshold",
    "LayerReport",
    "LoRASpectralCallback",
    "MetricWriter",
    "MitigationResult",
    "SpectralConfig",
    "SpectralMonitor",
    "SpectralReport",
    "TensorBoardWriter",
    "WeightMatrix",
    "scale_intruders",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The callback imports transformers; keep `import lora_spectral_callback` light for custom loops.
    if name == "LoRASpectralCallback":
        from .callback import LoRASpectralCallback

        return LoRASpectralCallback
    raise AttributeError(name)
