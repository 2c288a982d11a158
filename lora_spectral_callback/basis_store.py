"""Where the pretrained bases live: in memory, or in memory-mapped safetensors files reused across runs.

Pure torch + safetensors. The thin left singular basis ``U0`` of a pretrained weight is the one expensive,
one-time part of monitoring (a full decomposition) and, stored in fp16, as large as the weight itself in fp16.
Two things make it cheaper:

- a **cache** keyed by a hash of the weight (plus shape and dtypes): a sweep of runs on one base model computes
  each basis once (``cache_dir``);
- **disk storage** (``device="disk"``): the basis stays in its safetensors file and is memory-mapped, so the
  process holds only page cache the OS can drop, not resident copies; every measurement streams it once. Full
  fine-tuning mode keeps its pretrained weight copies the same way (``disk_copy``).

Files are standard safetensors (tensors ``"basis"`` and ``"singular_values"``), written atomically (temp file +
rename) so concurrent runs sharing a cache never read a half-written file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .metrics import fast_float64, pretrained_basis_and_spectrum

__all__ = ["BasisStore", "settle", "stream_fingerprint", "weight_fingerprint"]

_KEY, _SPECTRUM_KEY, _WEIGHT_KEY = "basis", "singular_values", "weight"
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


def weight_fingerprint(*weights: Tensor) -> str:
    """BLAKE2b hash of the weights' bytes, shapes and dtypes, in order: equal fingerprints mean the same basis
    (one weight) or the same baseline (several). Streams each weight: no concatenated copy is made."""
    return stream_fingerprint(weights)


def stream_fingerprint(weights: Iterable[Tensor]) -> str:
    """:func:`weight_fingerprint` of weights produced one at a time (e.g. read from a file): one in memory."""
    h = hashlib.blake2b(digest_size=16)
    for W in weights:
        data = W.detach().to("cpu").contiguous()
        h.update(f"{tuple(data.shape)}|{data.dtype}".encode())
        if data.numel():
            h.update(data.view(-1).view(torch.uint8).numpy().data)  # hashed in place, through a memoryview
    return h.hexdigest()


class BasisStore:
    """Computes, caches and hands out pretrained left bases.

    ``dtype``: storage dtype of the basis. ``device``: a torch device to hold it on, or ``"disk"`` to keep it
    memory-mapped from ``cache_dir`` (a private temporary directory when none is given). ``cache_dir``: reuse a
    basis computed earlier for a weight with the same fingerprint. ``method``: how a basis is computed (see
    :func:`.metrics.pretrained_basis_and_spectrum`; either gives the same basis up to rounding, so cached files are
    shared). ``computed`` counts the decompositions actually run.

    ``method="auto"`` picks by the device the weight is on: the float64 ``"gram"`` where float64 is fast (CPU, and
    the datacenter GPUs of :func:`.metrics.fast_float64`), else ``"svd"`` in float32 when the basis is stored in 16
    bits (``benchmarks/bench_snapshot.py``: its cosines are within 1e-5 of float64's, 50x below float16's own
    rounding of 4.9e-4, which the slack covers), and ``"gram"`` for a 32/64-bit basis, whose user asked for
    precision.

    A basis is handed out only once the work producing it has completed (:func:`settle`); a CPU basis for a CUDA
    weight is kept in pinned memory, so that measurements copy it to the GPU asynchronously.
    """

    def __init__(
        self, dtype: torch.dtype, device: str = "cpu", cache_dir: str | None = None, method: str = "auto"
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.method = method
        self._tmp = tempfile.TemporaryDirectory(prefix="lora-spectral-") if device == "disk" and not cache_dir else None
        self.cache_dir = self._tmp.name if self._tmp is not None else cache_dir
        self._copies: tempfile.TemporaryDirectory | None = None
        self.computed = 0

    @property
    def on_disk(self) -> bool:
        return self.device == "disk"

    def basis(self, W0: Tensor) -> tuple[Tensor, Tensor]:
        """The thin left singular basis of ``W0`` (already in the compute dtype), stored as configured, and its
        singular values (float64, CPU); from cache if possible."""
        if self.cache_dir is None:
            U0, S = self._compute(W0)
            return self._settled(self._placed(U0, W0.device), W0.device), S
        from safetensors import safe_open

        path = os.path.join(
            self.cache_dir, f"{weight_fingerprint(W0)}-{str(self.dtype).removeprefix('torch.')}.safetensors"
        )
        stored: set[str] = set()
        if os.path.exists(path):
            with safe_open(path, "pt") as f:
                stored = set(f.keys())
        if _SPECTRUM_KEY not in stored:  # missing, or written before spectra were kept
            U0, S = self._compute(W0)
            _save_atomically({_KEY: U0.to("cpu", self.dtype), _SPECTRUM_KEY: S}, path)
        with safe_open(path, "pt") as f:
            S = f.get_tensor(_SPECTRUM_KEY)
            U0 = _memory_map(path) if self.on_disk else self._placed(f.get_tensor(_KEY), W0.device)
        return self._settled(U0, W0.device), S

    def _placed(self, U0: Tensor, compute: torch.device) -> Tensor:
        """``U0`` in the storage dtype on the storage device, row-major (LAPACK returns it column-major; the cosine
        pass reads it in chunks of rows): pinned when it is the CPU and the weight is on CUDA (a copy from pageable
        memory is staged through a bounce buffer and blocks the host; from pinned memory it runs asynchronously,
        ordered on the stream like any kernel)."""
        if self.device == "cpu" and compute.type == "cuda":
            pinned = torch.empty(U0.shape, dtype=self.dtype, pin_memory=True)
            return pinned.copy_(U0.to(self.dtype), non_blocking=True)  # completed by _settled
        return U0.to(self.device, self.dtype, memory_format=torch.contiguous_format)

    @staticmethod
    def _settled(U0: Tensor, compute: torch.device) -> Tensor:
        for device in {compute, U0.device}:
            settle(device)
        return U0

    def disk_copy(self, W: Tensor) -> Tensor:
        """``W`` written to a safetensors file and returned memory-mapped. Copies are per run (a resumed run
        replaces them with its saved baseline), so they go to a private temporary directory, never into a shared
        cache, and the file is unlinked at once: the mapping keeps it readable, and its disk space is freed as
        soon as the tensor is dropped (where the OS refuses to unlink an open file, it goes at exit)."""
        if self._copies is None:
            self._copies = tempfile.TemporaryDirectory(prefix="lora-spectral-copies-")
        fd, path = tempfile.mkstemp(dir=self._copies.name, suffix=".safetensors")
        os.close(fd)
        _save_atomically({_WEIGHT_KEY: W.detach().to("cpu")}, path)
        copy = _memory_map(path, _WEIGHT_KEY)
        with contextlib.suppress(OSError):
            os.remove(path)
        return copy

    def _compute(self, W0: Tensor) -> tuple[Tensor, Tensor]:
        self.computed += 1
        return pretrained_basis_and_spectrum(W0, W0.dtype, self.method_for(W0.device))

    def method_for(self, device: torch.device) -> str:
        """The snapshot method used for a weight on ``device`` (see the class docstring for ``"auto"``)."""
        if self.method != "auto":
            return self.method
        narrow = torch.finfo(self.dtype).bits <= 16
        return "svd" if narrow and not fast_float64(device) else "gram"


def settle(device: torch.device) -> None:
    """Block this thread until the work queued so far on ``device``'s current stream has completed (a basis'
    decomposition, its asynchronous copies). A snapshot on a worker thread runs on a stream of its own: a basis
    published before would let a measurement on the training stream read it half-written; it stays pending
    until then. A no-op off CUDA, where an operation has completed when it returns."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _save_atomically(tensors: dict[str, Tensor], path: str) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: t.contiguous() for k, t in tensors.items()}, tmp, metadata={"producer": "lora-spectral-callback"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _memory_map(path: str, key: str = _KEY) -> Tensor:
    """Tensor ``key`` of a safetensors file as a copy-on-write memory map (no bytes read up front).

    safetensors' layout is an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape
    and byte offsets, then the raw data; we map the data region's bytes directly (``safe_open`` would copy them)
    and view them as the stored dtype, so bfloat16 works although numpy has no such type.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header[key]
    start, end = info["data_offsets"]
    if end == start:
        return torch.zeros(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
    raw = np.memmap(path, dtype=np.uint8, mode="c", offset=8 + header_len + start, shape=(end - start,))
    return torch.from_numpy(raw).view(_SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
