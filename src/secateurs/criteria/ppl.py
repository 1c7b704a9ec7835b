"""``ppl``: remove each unit alone and measure calibration perplexity (Shortened LLaMA).

The unit whose removal raises perplexity least is the least important; its score is that PPL.

Two data flows give the same scores (to float rounding): ``path="fast"`` (default) caches every
layer's calibration input once and scores a unit at layer c by running only layers c.. and the
head (``secateurs.layerwise``), with ``batch_size`` windows per forward; ``path="masked"`` runs
the whole model once per unit with the unit masked by hooks (the reference).
"""

from __future__ import annotations

import math

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.errors import ConfigError
from secateurs.layerwise import LayerRunner
from secateurs.objectives import mean_nll
from secateurs.objectives import objective as make_objective
from secateurs.units import Unit, masked

PATHS = ("fast", "masked")


@CRITERIA.register("ppl")
class Perplexity(Criterion):
    name = "ppl"
    summary = "calibration PPL with the unit removed alone (higher = more important)"

    def __init__(
        self,
        path: str = "fast",
        batch_size: int | str = 8,
        objective: str = "nll",
        top_k: int | str | None = None,
    ) -> None:
        if path not in PATHS:
            raise ConfigError(f"ppl path must be one of {PATHS}; got {path!r}.")
        self.path, self.batch_size = path, int(batch_size)
        extra = {} if top_k is None else {"top_k": int(top_k)}
        self.objective = make_objective(objective, **extra)
        if self.objective.name != "nll" and path != "fast":
            raise ConfigError(f"ppl: objective {objective!r} needs path='fast'.")

    def options(self) -> dict:
        return {"path": self.path, "batch_size": self.batch_size, **self.objective.options()}

    @torch.no_grad()
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        live = [i for i in range(ctx.num_layers()) if Unit(i, unit) not in ctx.removed]
        scores = torch.full(
            (ctx.num_layers(),), math.inf, dtype=torch.float64
        )  # removed: never again
        if hasattr(ctx.pipeline, "removal_nll"):  # layer by layer from disk: all at once
            if self.objective.name != "nll":
                raise ConfigError("ppl: layer by layer, only objective=nll is supported.")
            for layer, nll in ctx.pipeline.removal_nll(unit, live).items():
                scores[layer] = math.exp(nll)
            return scores
        if self.path == "fast":
            runner = LayerRunner(ctx.model, ctx.adapter, ctx.calibration, self.batch_size)
            runner.capture(ctx.removed)
            goal = self.objective
            goal.prepare(runner.logits_from(0))  # the dense reference, if it needs one

            def nll(layer: int) -> float:
                return goal(runner.logits_from(layer, (*ctx.removed, Unit(layer, unit))))

        else:
            nll = lambda layer: self._masked_nll(ctx, Unit(layer, unit))  # noqa: E731
        for layer in ctx.bar(live, f"ppl: {unit}s"):
            scores[layer] = self.objective.shown(nll(layer))
        return scores

    def _masked_nll(self, ctx: ScoringContext, unit: Unit) -> float:
        with masked(ctx.model, ctx.adapter, (*ctx.removed, unit)):
            return mean_nll(
                (batch, ctx.model(input_ids=batch, use_cache=False).logits)
                for batch in ctx.batches()
            )
