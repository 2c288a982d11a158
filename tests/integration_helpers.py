"""Shared by the framework and tracker tests: a float64 recount of a trained PEFT model, from PEFT's own merge."""

from __future__ import annotations

import copy

from helpers import reference_counts

from lora_spectral_callback.layout import weight_matrix


def recount_peft(peft_model, names: list[str], epsilon: list[float]) -> tuple[dict[float, int], dict[str, int]]:
    """``reference_counts`` of the layers ``names`` (module paths without PEFT's prefix): the pretrained weights
    from PEFT's ``unload()`` (the frozen base, untouched by training), the merged ones from ``merge_and_unload()``."""
    base = dict(copy.deepcopy(peft_model).unload().named_modules())
    merged = dict(copy.deepcopy(peft_model).merge_and_unload().named_modules())
    return reference_counts(
        {n: weight_matrix(base[n]).detach() for n in names},
        {n: weight_matrix(merged[n]).detach() for n in names},
        epsilon,
    )


def assert_counts_match(report, peft_model, epsilon: list[float], prefix: str = "") -> None:
    """The report's per-layer and total counts equal the float64 recount; ``prefix`` is what the monitor's layer
    names carry in front of the PEFT model's own paths (the attribute holding it, e.g. ``"model."``)."""
    names = [n.removeprefix(prefix) for n in report.layers]
    totals, per_layer = recount_peft(peft_model, names, epsilon)
    assert report.errors == {}
    assert {n.removeprefix(prefix): r.intruders for n, r in report.layers.items()} == per_layer
    assert report.intruders_total_by_epsilon == {f"{e:g}": totals[e] for e in epsilon}
