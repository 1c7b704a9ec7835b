"""``taylor``: Taylor importance of a unit (Shortened LLaMA / LLM-Pruner).

Depth: per weight S = |W ⊙ G| with G the gradient of the calibration loss summed (signed) over
batches; the unit's score is Σ S over all its parameters, norm weights included.

Width (LLM-Pruner), per group member (a row or column of one projection), with G the summed
gradient and F = Σ g² / N the diagonal Fisher over N batches:
``first`` Σ|W·G|, ``second`` Σ ½W²F, ``mixed`` Σ|W·G − ½W²F|, ``vector`` |Σ W·G| per row/column;
the group's slices are then combined with ``aggregation`` (sum, mean, max, prod).
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import (
    AGGREGATIONS,
    Criterion,
    ScoringContext,
    aggregate,
    calibration_loss,
)
from secateurs.errors import ConfigError
from secateurs.units.depth import masked
from secateurs.units.width import ParamSlice

ORDERS = ("first", "second", "mixed", "vector")


@CRITERIA.register("taylor")
class Taylor(Criterion):
    name = "taylor"
    uses_backward = True
    units = frozenset({"block", "attn", "mlp", "heads", "channels"})
    summary = "Σ|W ⊙ ∂L/∂W| over the unit's parameters, gradients summed over calibration batches"

    def __init__(self, order: str = "first", aggregation: str = "sum") -> None:
        if order not in ORDERS:
            raise ConfigError(f"taylor: unknown order {order!r}; expected one of {ORDERS}.")
        if aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"taylor: unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}."
            )
        self.order, self.aggregation = order, aggregation

    def options(self) -> dict[str, str]:
        return {"order": self.order, "aggregation": self.aggregation}

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        slices = [ctx.groups(layer, kind) for layer in range(ctx.num_layers())]
        params = {id(s.param): s.param for layer in slices for s in layer}
        grads, fisher = gradient_moments(ctx, list(params.values()))
        scores = []
        for layer in slices:
            parts = [self._slice_score(s, grads[id(s.param)], fisher[id(s.param)]) for s in layer]
            scores.append(aggregate(parts, self.aggregation))
        return scores

    def _slice_score(self, s: ParamSlice, g: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        w = s.param.detach().to(torch.float64)
        wg = s.per_group(w * g)  # (groups, members, rest)
        if self.order == "vector":
            return wg.sum(-1).abs().sum(-1)
        if self.order == "first":
            return wg.abs().sum((1, 2))
        second = s.per_group(0.5 * w * w * f)
        if self.order == "second":
            return second.sum((1, 2))
        return (wg - second).abs().sum((1, 2))

    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        model = ctx.model
        accumulate_gradients(ctx)
        try:
            scores = []
            for layer in range(ctx.num_layers()):
                modules = ctx.adapter.unit_modules(model, layer, unit)
                params = [p for m in modules for p in m.parameters() if p.grad is not None]
                scores.append(sum(float((p.detach() * p.grad).abs().sum()) for p in params))
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


def gradient_moments(
    ctx: ScoringContext, params: list[torch.nn.Parameter]
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per parameter: Σ_batches g (signed) and the diagonal Fisher Σ g² / N (float64)."""
    model = ctx.model
    total = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    squares = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    batches = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for batch in ctx.bar(ctx.batches(), "taylor: gradients"):
            model.zero_grad(set_to_none=True)
            calibration_loss(model, batch).backward()
            batches += 1
            for p in params:
                g = p.grad.to(torch.float64)
                total[id(p)] += g
                squares[id(p)] += g * g
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return total, {key: value / max(batches, 1) for key, value in squares.items()}
