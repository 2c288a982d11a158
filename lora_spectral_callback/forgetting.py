"""A forgetting proxy: how far the fine-tuned model has drifted from its base model on a fixed reference batch.

Shuttleworth et al. 2024 (arXiv 2410.21228) tie intruder dimensions to forgetting of the pretraining
distribution, which they measure as loss on pretraining data. That needs a pretraining corpus and a language-model
head; this module offers two cheap stand-ins on a small batch the user supplies (a few dozen sequences that
represent what the model should keep doing well). They are *proxies*, not the paper's measurement:

- ``"embedding_cosine"``: mean over the batch of the cosine between the mean-pooled last hidden state of the
  fine-tuned model and of the base model (1.0 = no drift). The base is the same model with its LoRA adapters
  disabled (PEFT's ``disable_adapter()``), so no copy of the model is kept; its embeddings are computed once and
  cached, since the base weights are frozen.
- ``"loss"``: the model's own loss on the batch (pass ``labels``: masked-LM labels for an encoder with an MLM head,
  ``labels=input_ids`` for a causal LM), and its increase over the base model's loss.

The base model is the LoRA model with its adapters disabled (``base="adapter_disabled"``, the default). A model
without adapters (full fine-tuning) has no base left to run once training has changed it: ``base="first_call"``
keeps the outputs of the first call as the base instead, which the callback makes at its step-0 measurement,
before any update.

Evaluation runs in eval mode (no dropout) under ``torch.no_grad()`` and restores the previous train/eval mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ForgettingProxy", "mean_pooled_last_hidden"]

_KINDS = ("embedding_cosine", "loss")
_BASES = ("adapter_disabled", "first_call")


def mean_pooled_last_hidden(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    """Mean of the last hidden states over the non-padding tokens (sentence-transformers' pooling), (batch, hidden)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1]
    mask = batch.get("attention_mask")
    if mask is None:
        return hidden.mean(dim=1)
    mask = mask.to(hidden.dtype)[..., None]
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)


class ForgettingProxy:
    """Drift of a model from its base on ``reference_batch``; call it with the model to get tagged metrics.

    ``reference_batch`` is a dict of tensors as the model's forward takes them (``input_ids``, ``attention_mask``,
    and ``labels`` for ``kind="loss"``); it is moved to the model's device at each call. Returned tags:
    ``spectral/forgetting/embedding_cosine``, ``spectral/forgetting/loss`` and ``spectral/forgetting/loss_increase``.

    Args:
        reference_batch: Tensors as the model's forward takes them; at least ``input_ids``.
        kind: ``"embedding_cosine"``, ``"loss"`` (needs ``labels``) or a list of both.
        base: What the model is compared with (see the module docstring).
    """

    def __init__(
        self,
        reference_batch: Mapping[str, Tensor],
        kind: str | Sequence[str] = "embedding_cosine",
        base: str = "adapter_disabled",
    ) -> None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if not kinds or any(k not in _KINDS for k in kinds):
            raise ValueError(f"kind={kind!r} is invalid: must be one or more of {_KINDS}")
        if base not in _BASES:
            raise ValueError(f"base={base!r} is invalid: must be one of {_BASES}")
        if not isinstance(reference_batch, Mapping) or "input_ids" not in reference_batch:
            raise ValueError("reference_batch is invalid: must be a dict of tensors with at least 'input_ids'")
        if "loss" in kinds and "labels" not in reference_batch:
            raise ValueError("reference_batch is invalid for kind='loss': it needs 'labels'")
        self.batch = dict(reference_batch)
        self.kinds = kinds
        self.base = base
        self._base: dict[str, Tensor | float] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.batch.items()}
            if not self._base:
                with _base_model(model) if self.base == "adapter_disabled" else contextlib.nullcontext():
                    self._base = self._measure(model, batch)
            return self._compare(self._measure(model, batch))
        finally:
            model.train(was_training)

    def _measure(self, model: nn.Module, batch: dict) -> dict[str, Tensor | float]:
        out: dict[str, Tensor | float] = {}
        if "embedding_cosine" in self.kinds:
            out["embedding"] = mean_pooled_last_hidden(model, batch).double()
        if "loss" in self.kinds:
            out["loss"] = float(model(**batch).loss)
        return out

    def _compare(self, now: dict[str, Tensor | float]) -> dict[str, float]:
        metrics = {}
        embedding, base_embedding = now.get("embedding"), self._base.get("embedding")
        if isinstance(embedding, Tensor) and isinstance(base_embedding, Tensor):
            cos = torch.nn.functional.cosine_similarity(embedding, base_embedding.to(embedding.device), dim=-1)
            metrics["spectral/forgetting/embedding_cosine"] = float(cos.mean())
        loss, base_loss = now.get("loss"), self._base.get("loss")
        if isinstance(loss, float) and isinstance(base_loss, float):
            metrics["spectral/forgetting/loss"] = loss
            metrics["spectral/forgetting/loss_increase"] = loss - base_loss
        return metrics


def _base_model(model: nn.Module) -> contextlib.AbstractContextManager:
    """PEFT's ``disable_adapter()`` context: the forward pass of the frozen base model, without a copy."""
    if not hasattr(model, "disable_adapter"):
        raise TypeError(
            "ForgettingProxy needs a PEFT model (with disable_adapter()) to compute the base model's outputs"
        )
    disable_adapter: Any = model.disable_adapter  # PeftModel's; nn.Module's typing sees a Tensor | Module
    return disable_adapter()
