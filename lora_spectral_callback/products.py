"""Float32 matrix products at float32 accuracy whatever reduced-precision matmul flags training has set.

Pure torch. ``Trainer(tf32=True)``, ``torch.backends.cuda.matmul.allow_tf32`` and
``torch.set_float32_matmul_precision("high" | "medium")`` let float32 products round their inputs to TF32 (11
significant bits, unit roundoff 2^-11 instead of float32's 2^-24) on CUDA, or to bfloat16 (8 bits) through oneDNN
on CPU. The solver's error bound (:mod:`.linalg`) and the cosines (:func:`.metrics.max_abs_cosine`) assume float32
products: a TF32 residual is wrong by ~5e-4 of ``sigma_1^2``, and the bound with it. The flags are process-global
(a context manager flipping them would change training's products while the monitor runs on a worker thread), so
they are left alone and the products are computed so that the rounding does not matter:

``x = hi + lo`` with ``hi`` the leading ``p`` significant bits of ``x`` (bits cut off: exactly representable in the
reduced format) and ``lo = x - hi`` (exact in float32, ``|lo| < 2^(1-p) |x|``); for bfloat16 ``lo`` is split once
more. Products of ``hi`` parts are exact in the float32 accumulator (``2p <= 24`` bits); only the parts of order
``2^(2-2p)`` and below are rounded or dropped. Keeping the products ``x_i y_j`` with ``i + j <= parts + 1``,
each term ``a_k b_k`` of a dot product is off by less than ``2^(2 + parts (1 - p)) |a_k b_k|`` (TF32: 2 parts, 3
products, 2^-18; bfloat16: 3 parts, 6 products, 2^-19), so a product of unit vectors gains at most that much
beyond float32's own accumulation error, whatever its length (``sum |a_k b_k| <= 1``): :func:`split_rounding`.
With IEEE float32 products (the default) a product is one plain ``@``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["matmul", "reduced_bits", "split_rounding"]

_BITS = {"tf32": 11, "bf16": 8}


def reduced_bits(device: torch.device) -> int | None:
    """Significant bits of the format float32 products on ``device`` may round their inputs to (11: TF32, 8:
    bfloat16), or None for IEEE float32. Read at every product: the flags are process-global and may change."""
    backend = {"cuda": torch.backends.cuda.matmul, "cpu": getattr(torch.backends.mkldnn, "matmul", None)}.get(
        device.type
    )
    precision = getattr(backend, "fp32_precision", None)
    if precision == "none":  # inherits the generic setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    if precision is None:  # torch < 2.9: the legacy flags
        legacy = torch.get_float32_matmul_precision()
        precision = "tf32" if legacy == "high" or (legacy == "medium" and device.type == "cuda") else "bf16"
        precision = "ieee" if legacy == "highest" else precision
    return _BITS.get(precision) if device.type in ("cuda", "cpu") else None


def _parts(bits: int) -> int:
    return 2 if bits >= 11 else 3


def split_rounding(device: torch.device, dtype: torch.dtype) -> float:
    """What a split product adds at most to the error of a product of unit vectors in ``dtype`` on ``device``
    (module docstring): 2^-18 for float32 while float32 products there are reduced, else 0 (other dtypes are never
    reduced). A bound reads it once per solve: flags changed during a solve (training scripts set them once, before
    training) are charged from the next one."""
    return 2.0**-18 if dtype == torch.float32 and reduced_bits(device) is not None else 0.0


def _split(x: Tensor, bits: int, parts: int) -> list[Tensor]:
    """``x`` as ``parts`` float32 tensors summing to it, each but the last exactly representable in ``bits``
    significant bits (the low ``24 - bits`` bits of the significand cut off)."""
    mask = -(1 << (24 - bits))  # ...1110000: keeps sign, exponent and the leading bits - 1 stored significand bits
    out = []
    for _ in range(parts - 1):
        hi = (x.view(torch.int32) & mask).view(torch.float32)
        out.append(hi)
        x = x - hi  # exact: the bits cut off
    return [*out, x]


_mm = torch.matmul  # the device's own product (tests put an emulated TF32 product here)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with float32 accuracy (module docstring): split into exactly representable parts when float32
    products on this device round to a narrower format, a plain ``@`` otherwise (and for other dtypes)."""
    bits = reduced_bits(a.device) if a.dtype == torch.float32 and b.dtype == torch.float32 else None
    if bits is None:
        return _mm(a, b)
    parts = _parts(bits)
    xs, ys = _split(a, bits, parts), _split(b, bits, parts)
    terms = sorted(((i, j) for i in range(parts) for j in range(parts) if i + j < parts), key=sum, reverse=True)
    out = _mm(xs[terms[0][0]], ys[terms[0][1]])  # smallest terms first: less rounding in the sum
    for i, j in terms[1:]:
        out = out + _mm(xs[i], ys[j])
    return out
