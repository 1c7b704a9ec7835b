"""``magnitude``: Σ|W|^p over the unit's weights (no data needed).

Depth units sum over their weight matrices; width groups over their rows/columns of every
projection (biases included), e.g. p=1 (L1) or p=2 (squared L2: the same ranking as L2).
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Layerwise, Observer, ScoringContext, aggregate
from secateurs.errors import ConfigError


@CRITERIA.register("magnitude")
class Magnitude(Layerwise):
    name = "magnitude"
    needs_calibration = False
    units = frozenset({"block", "attn", "mlp", "heads", "channels", "experts"})
    reads_stored_weights = True
    summary = "Σ|W|^p over the unit's weight matrices (p=1 default)"

    def __init__(self, p: float = 1.0) -> None:
        if p <= 0:
            raise ConfigError(f"magnitude: p must be positive, got {p}.")
        self.p = float(p)

    def options(self) -> dict[str, float]:
        return {"p": self.p}

    @torch.no_grad()
    def layer_score(
        self, ctx: ScoringContext, kind: str, layer: int, observed: Observer
    ) -> torch.Tensor:
        if kind in ("heads", "channels"):
            parts = [
                s.per_group(_widened(s.param.detach()).abs().pow(self.p)).sum((1, 2))
                for s in ctx.groups(layer, kind)
            ]
            return aggregate(parts, "sum")
        modules = ctx.adapter.unit_modules(ctx.model, layer, kind)
        matrices = [p for m in modules for p in m.parameters() if p.ndim == 2]
        total = sum(float(w.abs().pow(self.p).sum()) for w in matrices)
        return torch.tensor(total, dtype=torch.float64)

    @torch.no_grad()
    def score_experts(self, ctx: ScoringContext) -> list[torch.Tensor]:
        """Per MoE layer, Σ|W|^p over each expert's slice of every expert tensor."""
        from secateurs.units.experts import moe_layers

        scores = []
        for layer in moe_layers(ctx.model, ctx.adapter):
            with ctx.session.loaded(layer):
                scores.append(self.layer_experts(ctx, layer))
        return scores

    @torch.no_grad()
    def layer_experts(self, ctx: ScoringContext, layer: int) -> torch.Tensor:
        """One MoE layer's expert scores (its weights only: a layer loaded alone suffices)."""
        from secateurs.units.experts import expert_weights

        weights = expert_weights(ctx.model, ctx.adapter, layer)
        return sum(_widened(w).abs().pow(self.p).sum(1).to(torch.float64) for w in weights)


def _widened(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in float32 at least: a 16-bit weight a lazy session holds scores as the
    float32 weight it stands for."""
    return weight.to(torch.promote_types(weight.dtype, torch.float32))
