"""``fluctuation`` (FLAP): how much a group's output-projection inputs vary, weighted by W.

For input column j of o_proj / down_proj: Var(x_j) over calibration tokens × ‖W[:, j]‖²; a
group's score is the sum over its columns. A unit whose input barely fluctuates is well
replaced by its mean: pruning adds W[:, removed] · mean(x[removed]) to the output bias
(bias compensation; the means are left in ``ctx.extras["input_mean"][kind]``).
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, columns_per_group, input_statistics
from secateurs.width import output_weight_columns


@CRITERIA.register("fluctuation", aliases=("flap",))
class Fluctuation(Criterion):
    name = "fluctuation"
    units = frozenset({"heads", "channels"})
    summary = "Var(x_j)·‖W[:, j]‖² of the output projection's inputs, with bias compensation (FLAP)"

    def __init__(self, compensate: bool = True) -> None:
        self.compensate = bool(compensate)

    def options(self) -> dict[str, bool]:
        return {"compensate": self.compensate}

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        stats = input_statistics(ctx, kind, "fluctuation: inputs")
        conv1d = ctx.adapter.width_layout(kind).conv1d
        ctx.extras.setdefault("input_mean", {})[kind] = [s.mean for s in stats]
        scores = []
        for layer, stat in enumerate(stats):
            module, columns = ctx.output_projection(layer, kind)
            weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
            per_column = stat.variance.to(weight.device) * weight.pow(2).sum(0)
            scores.append(columns_per_group(per_column, columns).cpu())
        return scores
