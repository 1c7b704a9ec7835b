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
from typing import Any

import torch

from secateurs.edits import Perturbation, WidthMask


def lowest(values: torch.Tensor, fraction: float) -> tuple[int, ...]:
    """The round(fraction · n) lowest-scored units (at least one, never all)."""
    n = min(max(round(fraction * len(values)), 1), len(values) - 1)
    return tuple(sorted(values.argsort()[:n].tolist()))


@torch.no_grad()
def layer_sensitivity(
    flow: Any,
    scores: dict[str, Sequence[torch.Tensor]],
    layers: Sequence[int],
    fraction: float,
) -> dict[str, list[float]]:
    """s[kind][layer] = ΔL(masking the ``fraction`` lowest units of that layer) / fraction²
    (0 for layers outside ``layers``): every masked model in one pass of the flow."""
    probes = [
        (kind, layer, lowest(per_layer[layer], fraction))
        for kind, per_layer in scores.items()
        for layer in layers
        if len(per_layer[layer]) >= 2
    ]
    models = [Perturbation(0)] + [Perturbation(i, {i: WidthMask(k, u)}) for k, i, u in probes]
    losses = [float(loss.mean()) for loss in flow.losses(models)]
    out = {kind: [0.0] * len(per_layer) for kind, per_layer in scores.items()}
    for (kind, layer, units), loss in zip(probes, losses[1:], strict=True):
        share = len(units) / len(scores[kind][layer])
        out[kind][layer] = max(loss - losses[0], 0.0) / share**2
    return out
