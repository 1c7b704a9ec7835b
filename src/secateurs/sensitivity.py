"""Per-layer sensitivity to width pruning, learned from the calibration loss.

For every prunable layer and unit kind, the ``fraction`` lowest-scored units of that layer
alone are masked and the calibration loss increase ΔL is measured (one forward pass over the
calibration batches per layer and kind). Global allocation then spends the parameter budget
where it hurts least (``allocation.sensitivity_counts``): under the model ΔL_l(r) ≈ s_l · r²
(s_l = ΔL / fraction²), minimising Σ_l ΔL_l subject to the budget gives r_l ∝ c_l / s_l (c_l:
the parameters of a layer's units of that kind). This is what LLM-Pruner's hand-protected
first and last layers approximate: on SmolLM2 they are the most sensitive ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secateurs.criteria.base import ScoringContext, calibration_loss
from secateurs.width import width_masked


@torch.no_grad()
def mean_loss(ctx: ScoringContext) -> float:
    losses = [float(calibration_loss(ctx.model, batch)) for batch in ctx.batches()]
    return sum(losses) / len(losses)


def lowest(values: torch.Tensor, fraction: float) -> tuple[int, ...]:
    """The round(fraction · n) lowest-scored units (at least one, never all)."""
    n = min(max(round(fraction * len(values)), 1), len(values) - 1)
    return tuple(sorted(values.argsort()[:n].tolist()))


@torch.no_grad()
def layer_sensitivity(
    ctx: ScoringContext,
    scores: dict[str, Sequence[torch.Tensor]],
    layers: Sequence[int],
    fraction: float,
) -> dict[str, list[float]]:
    """s[kind][layer] = ΔL(masking the ``fraction`` lowest units of that layer) / fraction²
    (0 for layers outside ``layers``)."""
    base = mean_loss(ctx)
    out: dict[str, list[float]] = {}
    for kind, per_layer in scores.items():
        out[kind] = [0.0] * len(per_layer)
        for layer in ctx.bar(layers, f"sensitivity: {kind}"):
            if len(per_layer[layer]) < 2:
                continue
            units = lowest(per_layer[layer], fraction)
            removed = [units if i == layer else () for i in range(len(per_layer))]
            with width_masked(ctx.model, ctx.adapter, {kind: removed}):
                change = mean_loss(ctx) - base
            share = len(units) / len(per_layer[layer])
            out[kind][layer] = max(change, 0.0) / share**2
    return out
