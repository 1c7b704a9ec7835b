"""``activation``: Wanda-style |W|·‖X‖₂ of a width group (Wanda-sp).

For each input column j of the output projection (o_proj / down_proj), ‖X_j‖₂ is taken over
all calibration tokens; a group's score is Σ over its columns j and all rows i of |W_ij|·‖X_j‖.
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, columns_per_group, input_statistics
from secateurs.width import output_weight_columns


@CRITERIA.register("activation", aliases=("wanda",))
class Activation(Criterion):
    name = "activation"
    units = frozenset({"heads", "channels"})
    summary = "Σ|W_ij|·‖X_j‖₂ over the group's output-projection columns (Wanda, structured)"

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        stats = input_statistics(ctx, kind, "activation: inputs")
        conv1d = ctx.adapter.width_layout(kind).conv1d
        scores = []
        for layer, stat in enumerate(stats):
            module, columns = ctx.output_projection(layer, kind)
            weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
            per_column = weight.abs().sum(0) * stat.norm.to(weight.device)
            scores.append(columns_per_group(per_column, columns).cpu())
        return scores
