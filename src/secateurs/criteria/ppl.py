"""``ppl``: remove each unit alone and measure calibration perplexity (Shortened LLaMA).

The unit whose removal raises perplexity least is the least important; its score is that PPL.

Two data flows give the same scores (to float rounding): ``path="fast"`` (default) caches every
layer's calibration input once and scores a unit at layer c by running only layers c.. and the
head (``secateurs.layerwise``), with ``batch_size`` windows per forward; ``path="masked"`` runs
the whole model once per unit with the unit masked by hooks (the reference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.errors import ConfigError
from secateurs.layerwise import LayerRunner
from secateurs.units import Unit, masked

PATHS = ("fast", "masked")


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of windows ``ids`` (B, T) under ``logits`` (B, T, V), and count."""
    # Shift the targets, not the logits: no copy of the (B, T, V) logits is made.
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    flat = logits.reshape(-1, logits.size(-1))
    nll = F.cross_entropy(flat.float(), targets.reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def mean_nll(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean token NLL over (window ids, logits) batches."""
    total, count = 0.0, 0
    for ids, logits in pairs:
        nll, n = token_nll(logits, ids)
        total, count = total + nll, count + n
    return total / count


def unit_nll(runner: LayerRunner, removed: tuple[Unit, ...], unit: Unit) -> float:
    """Calibration mean NLL with ``removed`` and ``unit`` gone, from layer ``unit.layer`` on.

    The runner's cache must hold the inputs with ``removed`` gone (those after ``unit.layer``
    are not needed: the run recomputes them).
    """
    return mean_nll(runner.logits_from(unit.layer, (*removed, unit)))


@CRITERIA.register("ppl")
class Perplexity(Criterion):
    name = "ppl"
    summary = "calibration PPL with the unit removed alone (higher = more important)"

    def __init__(self, path: str = "fast", batch_size: int | str = 8) -> None:
        if path not in PATHS:
            raise ConfigError(f"ppl path must be one of {PATHS}; got {path!r}.")
        self.path, self.batch_size = path, int(batch_size)

    def options(self) -> dict:
        return {"path": self.path, "batch_size": self.batch_size}

    @torch.no_grad()
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        live = [i for i in range(ctx.num_layers()) if Unit(i, unit) not in ctx.removed]
        scores = torch.full(
            (ctx.num_layers(),), math.inf, dtype=torch.float64
        )  # removed: never again
        if hasattr(ctx.pipeline, "removal_nll"):  # layer by layer from disk: all at once
            for layer, nll in ctx.pipeline.removal_nll(unit, live).items():
                scores[layer] = math.exp(nll)
            return scores
        if self.path == "fast":
            runner = LayerRunner(ctx.model, ctx.adapter, ctx.calibration, self.batch_size)
            runner.capture(ctx.removed)
            nll = lambda layer: unit_nll(runner, ctx.removed, Unit(layer, unit))  # noqa: E731
        else:
            nll = lambda layer: self._masked_nll(ctx, Unit(layer, unit))  # noqa: E731
        for layer in ctx.bar(live, f"ppl: {unit}s"):
            scores[layer] = math.exp(nll(layer))
        return scores

    def _masked_nll(self, ctx: ScoringContext, unit: Unit) -> float:
        with masked(ctx.model, ctx.adapter, (*ctx.removed, unit)):
            return mean_nll(
                (batch, ctx.model(input_ids=batch, use_cache=False).logits)
                for batch in ctx.batches()
            )
