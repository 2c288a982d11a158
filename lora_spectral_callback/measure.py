"""Measuring merged weights: :func:`decompose` one matrix, a :class:`~.report.LayerReport` per layer, and the walk
over a model's matrices that makes a :class:`~.report.SpectralReport`.

:func:`decompose` is the detection step the live metrics, the mitigation and the CLI share: the top-k singular
triplets of a merged weight (the paper's Alg. 1, by the solver of :mod:`.linalg`), each left vector's max |cos|
with the pretrained basis, and how many of those cosines the solver's error bound cannot place on one side of a
threshold.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import DTYPES, SpectralConfig
from .guard import FaultGuard, NonFinite
from .linalg import (
    KrylovSpace,
    LowRankUpdatedMatrix,
    TopSVD,
    exact_top_singular_triplets,
    top_singular_triplets,
)
from .matrix import WeightMatrix
from .metrics import (
    all_finite,
    basis_rounding_error,
    count_intruders,
    first_intruder_position,
    intruder_energy_share,
    intruder_sigma_ratio,
    max_abs_cosine,
    pretrained_basis_and_spectrum,
)
from .products import split_rounding
from .ranks import GatherFailed
from .report import LayerReport, SpectralReport, eps_key
from .snapshot import LayerState

__all__ = ["EXACT_BASIS_BYTES", "Decomposition", "Measurer", "decompose", "float64_basis", "pretrained_decomposition"]

EXACT_BASIS_BYTES = 1 << 30  # float64 bases kept for threshold decisions (a 4096 x 4096 one is 128 MiB)


class Decomposition(NamedTuple):
    """The top-k triplets of one merged weight (``svd.block`` seeds the next solve), each left vector's max |cos|
    with the pretrained basis, how many of those cosines still lie closer to a threshold than their error bound
    (``uncertain``: expected 0), and how many the float64 pass settled (``resolved``)."""

    svd: TopSVD
    max_cos: Tensor
    uncertain: int
    resolved: int = 0


@torch.no_grad()
def decompose(
    matrix: WeightMatrix,
    basis: Tensor,
    config: SpectralConfig,
    *,
    shape: torch.Size | None = None,
    warm_start: KrylovSpace | None = None,
    generator_for: Callable[[torch.device], torch.Generator] | None = None,
    exact_basis: Callable[[], Tensor] | None = None,
    pretrained_sv: Tensor | None = None,
) -> Decomposition:
    """Top-k singular triplets of ``matrix``'s merged weight (in ``config.compute_dtype``) and their max |cos| with
    ``basis``, the thin left singular basis of its pretrained weight.

    Matrices with ``min(m, n) <= config.exact_below`` get a LAPACK SVD; the others the block Krylov solver, started
    from ``warm_start`` (the previous decomposition's ``svd.block``) or else from the top pretrained vectors, and
    stopped once every cosine is placed on one side of every threshold. A cosine closer to a threshold than the
    working precision (``compute_dtype``, the basis' storage dtype) can place is not guessed: that matrix is
    decomposed again in float64 against a float64 basis (see :func:`_resolve`), so its counts are those of a float64
    full SVD; a decision even float64 cannot make stays ``uncertain``.

    Args:
        matrix: The monitored matrix (see :class:`~.matrix.WeightMatrix`).
        basis: Thin left singular basis of the pretrained weight, as stored by a snapshot.
        config: Supplies ``top_k``, ``epsilons``, the solver options and ``compute_dtype``.
        shape: The snapshot's weight shape: a weight that changed shape since is refused.
        warm_start: The search space of the previous decomposition of this matrix.
        generator_for: The private generator for random fill on a device (default: a new one seeded with
            ``config.seed``); the global RNG is never touched.
        exact_basis: Gives the float64 thin left singular basis of the pretrained weight when a decision needs it
            (default: a float64 LAPACK SVD of ``matrix.base_weight()``, computed then).
        pretrained_sv: The pretrained weight's singular values from the same snapshot as ``basis``: while the update
            is exactly zero (LoRA's B = 0 at step 0) the merged weight *is* the pretrained one, and its decomposition
            is taken from the snapshot (:func:`pretrained_decomposition`) instead of solved for.

    Raises:
        ValueError: A changed shape, or NaN/Inf in the weights (:class:`~.guard.NonFinite`).

    Example:
        >>> import torch
        >>> from peft import LoraConfig, get_peft_model
        >>> from lora_spectral_callback import SpectralConfig
        >>> from lora_spectral_callback.discovery import find_lora_matrices
        >>> from lora_spectral_callback.metrics import pretrained_basis_and_spectrum
        >>> _ = torch.manual_seed(0)
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 64)), LoraConfig(target_modules=["0"]))
        >>> (matrix,), _ = find_lora_matrices(model)
        >>> basis, _ = pretrained_basis_and_spectrum(matrix.base_weight().float())
        >>> result = decompose(matrix, basis, SpectralConfig())
        >>> result.max_cos.min().item() > 0.999  # B = 0 at init: the merged weight is the pretrained one
        True
    """
    W0 = matrix.base_weight().detach()
    if shape is not None and W0.shape != shape:
        raise ValueError(f"weight shape {tuple(W0.shape)} no longer matches the snapshot {tuple(shape)}")
    W0 = W0.to(DTYPES[config.compute_dtype])
    checksum = float(W0.sum())  # the finiteness test's sum doubles as the solver's fingerprint of W0
    if not math.isfinite(checksum) and not all_finite(W0):
        raise NonFinite("base weight contains NaN or Inf")
    op = matrix.operator(W0)
    if op.B is not None and op.A is not None and not (all_finite(op.B) and all_finite(op.A)):
        raise NonFinite("LoRA factors contain NaN or Inf")
    if op.row_scale is not None and not all_finite(op.row_scale):
        raise NonFinite("DoRA row scale contains NaN or Inf")
    if op.W0 is not W0 and not all_finite(op.W0):  # a dense merged weight (full fine-tuning)
        raise NonFinite("fine-tuned weight contains NaN or Inf")
    if pretrained_sv is not None and zero_update(op, W0):
        return pretrained_decomposition(op, basis, pretrained_sv, config, warm_start)

    slack = basis_rounding_error(basis.dtype) + split_rounding(W0.device, W0.dtype)  # + TF32's share
    epsilons = torch.tensor(config.epsilons, dtype=W0.dtype, device=W0.device)

    def distance(max_cos: Tensor) -> Tensor:  # how far each cosine may move before a count flips
        return (max_cos[None, :] - epsilons[:, None]).abs().amin(dim=0) - slack

    cosines: dict[str, Tensor] = {}  # the solver's last margin check, reused below when it settled the answer

    def margin(U: Tensor) -> Tensor:
        cosines["U"], cosines["max_cos"] = U, max_abs_cosine(U, basis)
        return distance(cosines["max_cos"])

    if min(op.shape) <= config.exact_below:
        svd = exact_top_singular_triplets(op, config.top_k)
    else:
        start: Tensor | KrylovSpace | None = warm_start
        if start is None or start.shape[0] != op.shape[0]:
            start = basis[:, : config.top_k + config.oversample].to(W0.device, W0.dtype)
        svd = top_singular_triplets(
            op,
            config.top_k,
            start,
            oversample=config.oversample,
            tol=config.tol,
            max_iter=config.max_iter,
            needed_accuracy=margin,
            generator=(generator_for or _seeded(config.seed))(W0.device),
            checksum=checksum if op.W0 is W0 else None,  # a dense merged weight (full fine-tuning) is not W0
        )
    max_cos = cosines["max_cos"] if cosines.get("U") is svd.U else max_abs_cosine(svd.U, basis)
    if not torch.isfinite(svd.S).all():
        raise NonFinite("merged weight has non-finite singular values")
    result = Decomposition(svd, max_cos, int((distance(max_cos) < svd.error).sum()))
    if result.uncertain and (W0.dtype != torch.float64 or basis.dtype != torch.float64):
        return _resolve(matrix, config, result, exact_basis or (lambda: float64_basis(matrix)), generator_for)
    return result


def pretrained_decomposition(
    op: LowRankUpdatedMatrix,
    basis: Tensor,
    pretrained_sv: Tensor,
    config: SpectralConfig,
    warm_start: KrylovSpace | None,
) -> Decomposition:
    """The decomposition of a merged weight equal to the pretrained one, from its snapshot: the top-k left vectors are
    the basis' first k columns (max |cos| 1: no intruders), the singular values those of the snapshot's decomposition,
    exactly W0's; the right vectors ``W0^T u / sigma`` (one thin product). The next solve starts from ``warm_start``
    or, as a first measurement would, from the top pretrained vectors."""
    W0 = op.W0
    k = min(config.top_k, basis.shape[1])
    U = basis[:, :k].to(W0.device, W0.dtype)
    S = pretrained_sv[:k].to(W0.device, W0.dtype)
    V = op.rmatmul(U)
    V = V / torch.linalg.vector_norm(V, dim=0).clamp_min(torch.finfo(V.dtype).tiny)
    block = warm_start or KrylovSpace(basis[:, : config.top_k + config.oversample].to(W0.device, W0.dtype))
    zeros = torch.zeros(k, dtype=W0.dtype, device=W0.device)
    return Decomposition(TopSVD(U, S, V, zeros, 0, True, block), torch.ones_like(zeros), 0)


def float64_basis(matrix: WeightMatrix) -> Tensor:
    """The thin left singular basis of ``matrix``'s pretrained weight by a float64 LAPACK SVD: what a float64
    full-SVD recount compares against, on the weights' device."""
    return pretrained_basis_and_spectrum(matrix.base_weight().detach().double(), torch.float64, "svd")[0]


def _resolve(
    matrix: WeightMatrix,
    config: SpectralConfig,
    rough: Decomposition,
    exact_basis: Callable[[], Tensor],
    generator_for: Callable[[torch.device], torch.Generator] | None,
) -> Decomposition:
    """Settle the decisions ``rough`` left uncertain: the same matrix decomposed in float64 (factors and base weight
    in float64) against a float64 basis, where the bound and the basis are ~1e-15 wide instead of the ~1e-7 of
    float32 and 4.9e-4 of a float16 basis. It starts from ``rough``'s search space, already within fp32 of the
    answer, so it takes a step or a few. The triplets and cosines of that pass replace the rough ones (the counts
    are then a float64 full SVD's); the rough search space is kept to warm-start the next measurement in the
    working precision, and the steps of both passes are counted."""
    start = KrylovSpace(rough.svd.block.Q.double())
    fine = decompose(
        matrix,
        exact_basis(),
        replace(config, compute_dtype="float64"),
        warm_start=start,
        generator_for=generator_for,
    )
    svd = replace(fine.svd, block=rough.svd.block, iterations=rough.svd.iterations + fine.svd.iterations)
    return Decomposition(svd, fine.max_cos, fine.uncertain, rough.uncertain - fine.uncertain)


def _seeded(seed: int) -> Callable[[torch.device], torch.Generator]:
    return lambda device: torch.Generator(device=device).manual_seed(seed)


def unchanged(matrix: WeightMatrix, dtype: torch.dtype) -> bool:
    """Whether the merged weight is exactly the pretrained one (no update yet, as at step 0 of LoRA)."""
    W0 = matrix.base_weight().detach().to(dtype)
    return zero_update(matrix.operator(W0), W0)


def zero_update(op: LowRankUpdatedMatrix, W0: Tensor) -> bool:
    """Whether the operator built around ``W0`` is exactly ``W0``: its update is exactly zero."""
    if op.row_scale is not None:  # DoRA's m / ||W0||_row is 1 only up to rounding
        return False
    if op.W0 is not W0:  # a dense merged weight (full fine-tuning)
        return torch.equal(op.W0, W0)
    return op.B is None or op.A is None or not bool(op.B.any()) or not bool(op.A.any())


class Measurer:
    """Measures monitored matrices against the bases in ``layers`` and keeps each one's warm start and last vectors
    there; failures are recorded per layer (``strict`` re-raises), so one bad layer never ends a measurement."""

    def __init__(self, config: SpectralConfig, layers: dict[str, LayerState], guard: FaultGuard) -> None:
        self.config = config
        self.layers = layers
        self.guard = guard
        self._generators: dict[torch.device, torch.Generator] = {}
        self._exact_bases: OrderedDict[str, Tensor] = OrderedDict()  # float64 bases of layers that needed one

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.config.compute_dtype]

    def generator(self, device: torch.device) -> torch.Generator:
        """A private seeded generator per device: random fill never advances the global RNG."""
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generators[device]

    def exact_basis(self, matrix: WeightMatrix) -> Tensor:
        """The float64 basis a threshold decision of this layer needs (:func:`float64_basis`), kept for the layers
        that needed one most recently while they hold at most ``EXACT_BASIS_BYTES``: a layer near a threshold
        tends to stay there for several measurements."""
        cache = self._exact_bases
        if matrix.name in cache:
            cache.move_to_end(matrix.name)
            return cache[matrix.name]
        basis = cache[matrix.name] = float64_basis(matrix)
        while len(cache) > 1 and sum(b.numel() * b.element_size() for b in cache.values()) > EXACT_BASIS_BYTES:
            cache.popitem(last=False)
        return basis

    def decompose(self, matrix: WeightMatrix) -> Decomposition:
        """:func:`decompose` against this layer's snapshot, warm-started from and handing on to its last solve."""
        state = self.layers[matrix.name]
        if state.basis is None:
            raise RuntimeError("no pretrained snapshot of this layer: call snapshot() first")
        result = decompose(
            matrix,
            state.basis,
            self.config,
            shape=state.shape,
            warm_start=state.warm_start,
            generator_for=self.generator,
            exact_basis=lambda: self.exact_basis(matrix),
            pretrained_sv=state.pretrained_sv,
        )
        state.warm_start, state.last_vectors = result.svd.block, result.svd.U
        return result

    @torch.no_grad()
    def layer(self, matrix: WeightMatrix) -> LayerReport:
        """Top-k singular triplets of one merged weight, their max |cos| with the pretrained basis, and ranks."""
        cfg = self.config
        t0 = time.perf_counter()
        result = self.decompose(matrix)
        svd, max_cos = result.svd, result.max_cos
        pretrained_sv = self.layers[matrix.name].pretrained_sv
        assert pretrained_sv is not None  # taken with the basis
        counts = count_intruders(max_cos, cfg.epsilons)
        rank = matrix.update_effective_rank(svd.U.device, self.compute_dtype, self.generator(svd.U.device))
        sigma1 = float(pretrained_sv[0]) if pretrained_sv.numel() else 0.0  # kept from the snapshot SVD
        primary = cfg.epsilons[0]
        return LayerReport(
            intruders=counts[primary],
            intruders_by_epsilon={eps_key(e): n for e, n in counts.items()},
            max_cos=max_cos.tolist(),
            singular_values=svd.S.tolist(),
            effective_rank=rank,
            pretrained_sigma1=sigma1,
            intruder_energy_share=intruder_energy_share(svd.S, max_cos, primary),
            intruder_sigma_ratio=intruder_sigma_ratio(svd.S, max_cos, primary, sigma1),
            first_intruder=first_intruder_position(max_cos, primary),
            converged=svd.converged and result.uncertain == 0,
            iterations=svd.iterations,
            uncertain=result.uncertain,
            resolved=result.resolved,
            seconds=time.perf_counter() - t0,
        )

    def unchanged_report(self) -> LayerReport:
        """What the paper's Alg. 1 gives for a merged weight equal to the pretrained one: its top singular vectors
        are pretrained ones (max |cos| 1), so no intruders; the update is zero (effective rank 0)."""
        cfg = self.config
        return LayerReport(
            intruders=0,
            intruders_by_epsilon={eps_key(e): 0 for e in cfg.epsilons},
            max_cos=[1.0] * cfg.top_k,
            singular_values=[],
            effective_rank=0.0,
            pretrained_sigma1=math.nan,  # no snapshot yet
            intruder_energy_share=0.0,
            intruder_sigma_ratio=0.0,
            first_intruder=cfg.top_k + 1,
        )

    def walk(
        self,
        step: int | None,
        matrices: Iterable[WeightMatrix | GatherFailed],
        model: nn.Module,
        snapshot: Callable[[WeightMatrix], None] | None = None,
    ) -> SpectralReport:
        """Measure each matrix in turn into one report. ``snapshot`` takes a missing basis first (sharded weights:
        from the gathered copy). A layer whose basis a background snapshot has not reached yet is ``pending``,
        unless its merged weight is still exactly the pretrained one (then it is reported exactly)."""
        start = time.perf_counter()
        layers: dict[str, LayerReport] = {}
        errors: dict[str, str] = {}
        nonfinite: list[str] = []
        pending: list[str] = []
        present = {id(module) for module in model.modules()}
        for matrix in matrices:
            state = self.layers[matrix.name]
            if snapshot is not None and state.basis is None and not isinstance(matrix, GatherFailed):
                snapshot(matrix)
            try:
                if isinstance(matrix, GatherFailed):
                    raise RuntimeError(f"gathering the sharded weights failed: {matrix.error}")
                if id(matrix.module) not in present:
                    raise RuntimeError("layer is no longer part of the model (removed or replaced since the snapshot)")
                if state.snapshot_error is not None:
                    kind, message = state.snapshot_error
                    raise kind(message)
                if state.basis is None:  # a background snapshot has not reached this layer yet
                    if unchanged(matrix, self.compute_dtype):
                        layers[matrix.name] = self.unchanged_report()
                    else:
                        pending.append(matrix.name)
                    continue
                layers[matrix.name] = self.layer(matrix)
            except NonFinite as err:
                nonfinite.append(matrix.name)
                errors[matrix.name] = str(err)
                self.guard.warn_once((matrix.name, "nonfinite"), f"{matrix.name}: {err}")
            except Exception as err:  # monitoring must never take the training run down
                if self.config.strict:
                    raise
                errors[matrix.name] = f"{type(err).__name__}: {err}"
                message = f"skipping {matrix.name} in this measurement: {errors[matrix.name]}"
                self.guard.warn_once((matrix.name, type(err).__name__), message)
            del matrix  # a gathered copy goes before the next one is gathered
        return SpectralReport.from_layers(
            step, list(self.config.epsilons), layers, errors, nonfinite, time.perf_counter() - start, pending
        )
