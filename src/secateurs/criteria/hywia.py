"""``hywia``: hybrid-grained weight importance with adaptive fusion (HyWIA).

HyWIA fuses a *fine-grained* importance (per weight) and a *coarse-grained* one (per group),
weighting them per group with attention-style adaptive weights and no extra training. The
paper leaves the exact statistics open; what we implement, per width group g of a layer, with
G the calibration-loss gradient summed (signed) over batches and the group's weights W_g (all
its rows/columns in every projection):

    fine      F_g = Σ_{w ∈ W_g} |w · G_w|          (element-wise first-order Taylor)
    coarse    C_g = ΔL_g of ``influence``           (``coarse="influence"``, default: the
                                                    loss change of removing the whole group
                                                    *and* re-fitting what remains, floored
                                                    at 0 — the model reconstruction makes)
          or  C_g = |Σ_{w ∈ W_g} w · G_w|          (``coarse="taylor"``: group-level first-order
                                                    Taylor, the loss change of zeroing it)
    normalise F̃ = F / mean_layer(F),  C̃ = C / mean_layer(C)      (scale-free per layer)
    fuse      (α_F, α_C) = softmax([F̃_g, C̃_g] / τ);   score_g = α_F F̃_g + α_C C̃_g

The softmax attends to the granularity that finds the group *more* important, so a group is
pruned only when both views agree it matters little. τ (``temperature``, default 0.25) → ∞
gives the plain average; τ → 0 the maximum. The fusion weights α_F are saved with the scores
for inspection.
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.criteria.taylor import gradient_moments
from secateurs.errors import ConfigError
from secateurs.units.depth import masked

COARSE_VIEWS = ("influence", "taylor")
# Chosen on held-out C4 training windows (not the test sets) among 0.05 ... 4 and the plain
# mean / maximum, at LLM-Pruner's configuration with reconstruction (docs/criteria.md).
TEMPERATURE = 0.25


@CRITERIA.register("hywia")
class HyWIA(Criterion):
    name = "hywia"
    uses_backward = True
    units = frozenset({"heads", "channels"})
    summary = (
        "fine (|W·G| per weight) and coarse (group ΔL after re-fit) importance, fused by attention"
    )

    def __init__(self, temperature: float = TEMPERATURE, coarse: str = "influence") -> None:
        if not temperature > 0:
            raise ConfigError(f"hywia: temperature must be positive, got {temperature}.")
        if coarse not in COARSE_VIEWS:
            raise ConfigError(
                f"hywia: unknown coarse view {coarse!r}; expected one of {COARSE_VIEWS}."
            )
        self.temperature, self.coarse = float(temperature), coarse

    def options(self) -> dict[str, float | str]:
        return {"temperature": self.temperature, "coarse": self.coarse}

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        slices = [ctx.groups(layer, kind) for layer in range(ctx.num_layers())]
        params = list({id(s.param): s.param for layer in slices for s in layer}.values())
        with masked(ctx.model, ctx.adapter, ctx.removed):
            grads, _ = gradient_moments(ctx, params)
        group_changes = self._group_changes(ctx, kind)
        scores, fusion = [], []
        for index, layer in enumerate(slices):
            wg = [
                s.per_group(s.param.detach().to(torch.float64) * grads[id(s.param)]) for s in layer
            ]
            fine = sum(part.abs().sum((1, 2)) for part in wg)
            if group_changes is None:
                coarse = sum(part.sum((1, 2)) for part in wg).abs()
            else:  # a removal predicted to help is as unimportant as one predicted free
                coarse = group_changes[index].to(torch.float64).clamp_min(0)
            score, alpha = fuse(fine, coarse, self.temperature)
            scores.append(score)
            fusion.append(alpha.tolist())
        ctx.extras.setdefault("fusion_weight_fine", {})[kind] = fusion
        return scores

    def _group_changes(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor] | None:
        """The coarse view from ``influence`` (None: the group-level Taylor view)."""
        if self.coarse != "influence":
            return None
        return CRITERIA.get("influence")().score_width(ctx, kind)


def fuse(
    fine: torch.Tensor, coarse: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer normalised fine/coarse scores fused by a softmax over the two granularities.

    Returns (fused scores, α_fine) with shapes (groups,).
    """
    views = torch.stack([_normalised(fine), _normalised(coarse)], dim=-1)  # (groups, 2)
    alpha = torch.softmax(views / temperature, dim=-1)
    return (alpha * views).sum(-1), alpha[:, 0]


def _normalised(values: torch.Tensor) -> torch.Tensor:
    mean = values.mean()
    return values / mean if mean > 0 else torch.zeros_like(values)
