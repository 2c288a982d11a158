"""Post-hoc comparison of a fully fine-tuned model with its pretrained model (no LoRA factors to exploit).

The same measurement as the monitor, on dense weights: the merged matrix is the fine-tuned weight itself
(``LowRankUpdatedMatrix(W_ft)``), the pretrained thin left basis comes from ``W0``, and the effective rank is
that of the full update ``W_ft - W0`` (float64 ``svdvals``: the update is not low-rank, so there is no cheap
exact route). Shuttleworth et al. 2024 find full fine-tuning has far fewer intruder dimensions than LoRA;
this mode lets the two be compared with one definition.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .linalg import LowRankUpdatedMatrix, exact_top_singular_triplets, top_singular_triplets
from .metrics import count_intruders, effective_rank, max_abs_cosine, pretrained_left_basis
from .report import LayerReport, LayerSpectra, SpectralReport, _eps_key

__all__ = ["matching_weights", "compare_matrix", "compare_models"]


def _weight(module: nn.Module) -> Tensor | None:
    """(out, in) weight of a Linear or a GPT-2 style ``Conv1D`` (stored (in, out)); None for other modules."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if isinstance(module, Conv1D):
        return module.weight.detach().T
    return None


def matching_weights(base: nn.Module, tuned: nn.Module, include: str | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{name: (W0, W_ft)}`` for every Linear/Conv1D present under the same name in both models.

    Raises ValueError naming the first module whose shapes differ, or when no module is shared.
    """
    tuned_modules = dict(tuned.named_modules())
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in base.named_modules():
        W0 = _weight(module)
        W = _weight(tuned_modules[name]) if name in tuned_modules else None
        if W0 is None or W is None or (include and not re.search(include, name)):
            continue
        if W0.shape != W.shape:
            raise ValueError(f"shape mismatch for {name}: base {tuple(W0.shape)} vs fine-tuned {tuple(W.shape)}")
        pairs[name] = (W0, W)
    if not pairs:
        raise ValueError("the two models share no Linear/Conv1D module" + (f" matching --include {include!r}" if include else ""))
    return pairs


@torch.no_grad()
def compare_matrix(
    W0: Tensor,
    W: Tensor,
    top_k: int,
    epsilons: Sequence[float],
    *,
    exact_below: int = 512,
    n_pretrained: int | None = None,
) -> tuple[LayerReport, LayerSpectra | None]:
    """Intruders of ``W`` against ``W0`` (paper Alg. 1), effective rank of ``W - W0``, and, when ``n_pretrained``
    is given, the |cos| matrix and pretrained spectrum for pictures.

    Small matrices use a float64 LAPACK SVD; larger ones the warm-started subspace iteration seeded with the
    pretrained top vectors, iterated until every count is decided (as in the monitor).
    """
    t0 = time.perf_counter()
    W0, W = W0.float(), W.float()
    U0 = pretrained_left_basis(W0)
    op = LowRankUpdatedMatrix(W)
    eps = torch.tensor(list(epsilons), dtype=W.dtype)

    def margin(U: Tensor) -> Tensor:
        return (max_abs_cosine(U, U0)[None, :] - eps[:, None]).abs().amin(dim=0)

    if min(W.shape) <= exact_below:
        svd = exact_top_singular_triplets(op, top_k)
    else:
        svd = top_singular_triplets(op, top_k, U0[:, : top_k + 10], needed_accuracy=margin, generator=torch.Generator().manual_seed(0))
    max_cos = max_abs_cosine(svd.U, U0)
    counts = count_intruders(max_cos, list(epsilons))
    report = LayerReport(
        intruders=counts[epsilons[0]],
        intruders_by_epsilon={_eps_key(e): n for e, n in counts.items()},
        max_cos=max_cos.tolist(),
        singular_values=svd.S.tolist(),
        effective_rank=effective_rank(torch.linalg.svdvals((W.double() - W0.double()))),
        converged=svd.converged,
        iterations=svd.iterations,
        uncertain=int((margin(svd.U) < svd.error).sum()),
        seconds=time.perf_counter() - t0,
    )
    spectra = None
    if n_pretrained:
        cos = (U0[:, :n_pretrained].T @ svd.U).abs().T
        spectra = LayerSpectra(cos.tolist(), torch.linalg.svdvals(W0.double())[:n_pretrained].tolist())
    return report, spectra


def compare_models(
    pairs: dict[str, tuple[Tensor, Tensor]],
    top_k: int,
    epsilons: Sequence[float],
    *,
    n_pretrained: int | None = None,
    progress: bool = True,
) -> tuple[SpectralReport, dict[str, LayerSpectra]]:
    """Run :func:`compare_matrix` over ``pairs`` and sum the counts into one report (step None)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    layers: dict[str, LayerReport] = {}
    spectra: dict[str, LayerSpectra] = {}
    for name, (W0, W) in tqdm(pairs.items(), desc="comparing", disable=not progress, leave=False):
        layers[name], data = compare_matrix(W0, W, top_k, epsilons, n_pretrained=n_pretrained)
        if data is not None:
            spectra[name] = data
    report = SpectralReport.from_layers(None, list(epsilons), layers, seconds=time.perf_counter() - start)
    return report, spectra
