"""Expert criteria: how often the router picks each expert, and REAP's router-weighted norm.

Both observe the routing on calibration data (``secateurs.experts.observe_routing``) and are
pure tensor math over it: per MoE layer, one score per expert (higher = keep).

- ``frequency``: the fraction of calibration tokens whose top-k includes the expert.
- ``reap`` (REAP, Lasby et al. 2025): S_j = mean over the tokens routed to j of
  g_j(x) · ‖E_j(x)‖₂, the router's gate weight times the norm of the expert's output; an expert
  never picked scores 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.units.experts import Routing, moe_layers, num_experts, observe_routing

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from secateurs.adapters.base import Adapter


def picks(r: Routing, count: int) -> torch.Tensor:
    """How many of the batch's tokens picked each expert (top-k membership)."""
    picked = r.indices.reshape(-1).to(torch.long).cpu()
    picked = picked[(picked >= 0) & (picked < count)]  # some families pad with an out-of-range id
    return torch.bincount(picked, minlength=count).to(torch.float64)


class RoutingTally:
    """Per MoE layer sums and counts of a routing criterion, fed one ``Routing`` at a time (by
    whole-model forwards or by one loaded layer after another)."""

    def __init__(self, criterion: _RoutingCriterion, counts: dict[int, int]) -> None:
        self.criterion = criterion
        self.sums = {i: torch.zeros(n, dtype=torch.float64) for i, n in counts.items()}
        self.counts = {i: torch.zeros(n, dtype=torch.float64) for i, n in counts.items()}
        self.usage = {i: torch.zeros(n, dtype=torch.float64) for i, n in counts.items()}
        self.tokens = dict.fromkeys(counts, 0)

    def observe(self, r: Routing) -> None:
        self.tokens[r.layer] += r.hidden.shape[0]
        self.usage[r.layer] += picks(r, len(self.sums[r.layer]))
        self.criterion.accumulate(r, self.sums[r.layer], self.counts[r.layer])

    def finish(self, extras: dict) -> list[torch.Tensor]:
        """Scores per MoE layer (in layer order); the usage goes to ``extras`` for the report,
        whatever the criterion."""
        layers = list(self.sums)
        extras["expert_usage"] = {
            str(i): (self.usage[i] / max(self.tokens[i], 1)).tolist() for i in layers
        }
        finish = self.criterion.finish
        return [finish(self.sums[i], self.counts[i], self.tokens[i]) for i in layers]


class _RoutingCriterion(Criterion):
    units = frozenset({"experts"})

    def tally(self, model: PreTrainedModel, adapter: Adapter) -> RoutingTally:
        """Empty sums for every MoE layer of ``model`` (a ``meta`` model will do)."""
        layers = moe_layers(model, adapter)
        return RoutingTally(self, {i: num_experts(model, adapter, i) for i in layers})

    @torch.no_grad()
    def score_experts(self, ctx: ScoringContext) -> list[torch.Tensor]:
        """Per MoE layer (in ``moe_layers`` order), one score per expert: each MoE layer's
        routing observed while the flow runs the windows through it."""
        tally = self.tally(ctx.model, ctx.adapter)
        wanted = set(tally.sums)
        ctx.flow.set_base(ctx.removed)
        for step in ctx.flow.walk(desc=f"{self.name}: routing"):
            observed = [step.index] if step.index in wanted else []
            with observe_routing(ctx.model, ctx.adapter, tally.observe, observed):
                step.advance()
        return tally.finish(ctx.extras)

    def accumulate(self, r: Routing, sums: torch.Tensor, counts: torch.Tensor) -> None:
        raise NotImplementedError

    def finish(self, sums: torch.Tensor, counts: torch.Tensor, tokens: int) -> torch.Tensor:
        raise NotImplementedError


@CRITERIA.register("frequency", aliases=("router-frequency",))
class RouterFrequency(_RoutingCriterion):
    name = "frequency"
    summary = "fraction of calibration tokens whose router top-k picks the expert"

    def accumulate(self, r: Routing, sums: torch.Tensor, counts: torch.Tensor) -> None:
        sums += picks(r, len(sums))

    def finish(self, sums: torch.Tensor, counts: torch.Tensor, tokens: int) -> torch.Tensor:
        return sums / max(tokens, 1)


@CRITERIA.register("reap")
class Reap(_RoutingCriterion):
    name = "reap"
    summary = "REAP: mean over routed tokens of gate weight x expert output norm"

    def accumulate(self, r: Routing, sums: torch.Tensor, counts: torch.Tensor) -> None:
        indices = r.indices.to(torch.long)
        for expert in torch.unique(indices).tolist():
            if not 0 <= expert < len(sums):
                continue
            tokens, slot = torch.where(indices == expert)
            gate = r.weights[tokens, slot].to(torch.float64)
            norm = r.expert_output(expert, r.hidden[tokens]).to(torch.float64).norm(dim=-1)
            sums[expert] += float((gate * norm).sum())
            counts[expert] += len(tokens)

    def finish(self, sums: torch.Tensor, counts: torch.Tensor, tokens: int) -> torch.Tensor:
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.zeros_like(sums))
