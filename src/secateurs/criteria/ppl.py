"""``ppl``: remove each unit alone and measure calibration perplexity (Shortened LLaMA).

The unit whose removal raises perplexity least is the least important; its score is that PPL.
"""

from __future__ import annotations

import math

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, calibration_loss
from secateurs.units import Unit, masked


@CRITERIA.register("ppl")
class Perplexity(Criterion):
    name = "ppl"
    summary = "calibration PPL with the unit removed alone (higher = more important)"

    @torch.no_grad()
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        scores = []
        for layer in ctx.bar(range(ctx.num_layers()), f"ppl: {unit}s"):
            if Unit(layer, unit) in ctx.removed:
                scores.append(math.inf)  # already gone; never chosen again
                continue
            with masked(ctx.model, ctx.adapter, (*ctx.removed, Unit(layer, unit))):
                losses = [float(calibration_loss(ctx.model, batch)) for batch in ctx.batches()]
            scores.append(math.exp(sum(losses) / len(losses)))
        return torch.tensor(scores, dtype=torch.float64)
