"""``ppl``: remove each unit alone and measure calibration perplexity (Shortened LLaMA).

The unit whose removal raises perplexity least is the least important; its score is that PPL
(or, with ``objective=kl``, the KL divergence from the base model's predictions). Each candidate
is a modified model handed to the flow, which advances all of them in lockstep from the layer
they start at: in memory or one layer at a time from disk, the same computation.
"""

from __future__ import annotations

import math

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.edits import Perturbation, Removal
from secateurs.errors import ConfigError
from secateurs.objectives import measure, prepare
from secateurs.objectives import objective as make_objective
from secateurs.plan import Unit


@CRITERIA.register("ppl")
class Perplexity(Criterion):
    name = "ppl"
    summary = "calibration PPL with the unit removed alone (higher = more important)"

    def __init__(self, objective: str = "nll", top_k: int | str | None = None) -> None:
        extra = {} if top_k is None else {"top_k": int(top_k)}
        self.objective = make_objective(objective, **extra)

    def options(self) -> dict:
        return self.objective.options()

    def streams(self, num_layers: int) -> int:
        return num_layers  # one per candidate layer

    @torch.no_grad()
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        if ctx.flow is None:
            raise ConfigError("ppl needs calibration data.")
        live = [i for i in range(ctx.num_layers()) if Unit(i, unit) not in ctx.removed]
        scores = torch.full((ctx.num_layers(),), math.inf, dtype=torch.float64)  # removed: never
        ctx.flow.set_base(ctx.removed)
        prepare(ctx.flow, self.objective)  # a divergence compares with the base model
        models = [Perturbation(layer, {layer: Removal(unit)}) for layer in live]
        for layer, value in zip(live, measure(ctx.flow, self.objective, models), strict=True):
            scores[layer] = self.objective.shown(value)
        return scores
