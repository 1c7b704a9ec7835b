"""``activation``: Wanda-style |W|·‖X‖₂ of a width group (Wanda-sp).

For each input column j of the output projection (o_proj / down_proj), ‖X_j‖₂ is taken over
all calibration tokens; a group's score is Σ over its columns j and all rows i of |W_ij|·‖X_j‖.
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


@CRITERIA.register("activation", aliases=("wanda",))
class Activation(Layerwise):
    name = "activation"
    units = frozenset({"heads", "channels"})
    reads_stored_weights = True
    summary = "Σ|W_ij|·‖X_j‖₂ over the group's output-projection columns (Wanda, structured)"

    def observer(self, ctx: ScoringContext, kind: str, layer: int) -> ProjectionInputs:
        return ProjectionInputs(ctx, layer, kind)

    @torch.no_grad()
    def layer_score(
        self, ctx: ScoringContext, kind: str, layer: int, observed: ProjectionInputs
    ) -> torch.Tensor:
        conv1d = ctx.adapter.width_layout(kind).conv1d
        weight = output_weight_columns(observed.module, conv1d)
        per_column = column_sums(weight) * observed.stats.norm.to(weight.device)
        return columns_per_group(per_column, observed.columns)
