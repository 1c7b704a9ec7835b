"""``fluctuation`` (FLAP): how much a group's output-projection inputs vary, weighted by W.

For input column j of o_proj / down_proj: Var(x_j) over calibration tokens × ‖W[:, j]‖²; a
group's score is the sum over its columns. A unit whose input barely fluctuates is well
replaced by its mean: pruning adds W[:, removed] · mean(x[removed]) to the output bias
(bias compensation; the means are left in ``ctx.extras["input_mean"][kind]``).
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import (
    Layerwise,
    ProjectionInputs,
    ScoringContext,
    column_sums,
    columns_per_group,
)
from secateurs.units.width import output_weight_columns


@CRITERIA.register("fluctuation", aliases=("flap",))
class Fluctuation(Layerwise):
    name = "fluctuation"
    units = frozenset({"heads", "channels"})
    reads_stored_weights = True
    summary = "Var(x_j)·‖W[:, j]‖² of the output projection's inputs, with bias compensation (FLAP)"

    def __init__(self, compensate: bool = True) -> None:
        self.compensate = bool(compensate)

    def options(self) -> dict[str, bool]:
        return {"compensate": self.compensate}

    def observer(self, ctx: ScoringContext, kind: str, layer: int) -> ProjectionInputs:
        return ProjectionInputs(ctx, layer, kind)

    @torch.no_grad()
    def layer_score(
        self, ctx: ScoringContext, kind: str, layer: int, observed: ProjectionInputs
    ) -> torch.Tensor:
        means = ctx.extras.setdefault("input_mean", {})
        if len(means.get(kind, ())) != ctx.num_layers():
            means[kind] = [None] * ctx.num_layers()  # None: a block the base model removes
        means[kind][layer] = observed.stats.mean
        conv1d = ctx.adapter.width_layout(kind).conv1d
        weight = output_weight_columns(observed.module, conv1d)
        per_column = observed.stats.variance.to(weight.device) * column_sums(weight, power=2)
        return columns_per_group(per_column, observed.columns)
