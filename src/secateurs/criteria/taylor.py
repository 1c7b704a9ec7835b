"""``taylor``: first-order Taylor importance of a unit (Shortened LLaMA / LLM-Pruner).

Per weight S = |W ⊙ G| with G the gradient of the calibration loss summed (signed) over batches;
the unit's score is Σ S over all its parameters, norm weights included.
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, calibration_loss
from secateurs.units import masked


@CRITERIA.register("taylor")
class Taylor(Criterion):
    name = "taylor"
    uses_backward = True
    summary = "Σ|W ⊙ ∂L/∂W| over the unit's parameters, gradients summed over calibration batches"

    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        model = ctx.model
        accumulate_gradients(ctx)
        try:
            scores = []
            for layer in range(ctx.num_layers()):
                params = [p for m in ctx.adapter.unit_modules(model, layer, unit) for p in m.parameters()]
                scores.append(sum(float((p.detach() * p.grad).abs().sum()) for p in params if p.grad is not None))
            return torch.tensor(scores, dtype=torch.float64)
        finally:
            model.zero_grad(set_to_none=True)


def accumulate_gradients(ctx: ScoringContext) -> None:
    """Sum ∂L/∂W over calibration batches into ``.grad`` (masked units stay masked)."""
    model = ctx.model
    model.zero_grad(set_to_none=True)
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with masked(model, ctx.adapter, ctx.removed):
            for batch in ctx.bar(ctx.batches(), "taylor: gradients"):
                calibration_loss(model, batch).backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
