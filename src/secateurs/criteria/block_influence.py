"""``block-influence``: 1 − cos(h_in, h_out) of a unit, averaged over tokens (ShortGPT).

Uses the unit's own input and output on the residual stream. For a branch, the stream is taken
just before and just after the branch is added: the layer is re-run with its MLP masked to get
the state between attention and MLP (exact for sequential pre-norm blocks; for parallel-residual
blocks it is the attention branch's share of the update).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.units import Unit, first_arg, masked


@CRITERIA.register("block-influence", aliases=("bi", "shortgpt"))
class BlockInfluence(Criterion):
    name = "block-influence"
    summary = "mean over tokens of 1 − cos(stream before, stream after) the unit (ShortGPT)"

    @torch.no_grad()
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        totals = torch.zeros(ctx.num_layers(), dtype=torch.float64)
        count = 0
        with masked(ctx.model, ctx.adapter, ctx.removed), _Recorder(ctx, unit) as recorder:
            for batch in ctx.bar(ctx.batches(), "block-influence"):
                ctx.model(input_ids=batch, use_cache=False)
                totals += recorder.pop_batch()
                count += batch.numel()
        return totals / count


class _Recorder:
    """Forward hooks on every layer that add up per-token 1 − cos for the chosen unit kind."""

    def __init__(self, ctx: ScoringContext, unit: str) -> None:
        self.ctx, self.unit = ctx, unit
        self.sums = torch.zeros(ctx.num_layers(), dtype=torch.float64)
        self.handles: list[Any] = []
        self.rerunning = False

    def __enter__(self) -> _Recorder:
        for index, layer in enumerate(self.ctx.adapter.layers(self.ctx.model)):
            self.handles.append(layer.register_forward_hook(self._hook(index), with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def pop_batch(self) -> torch.Tensor:
        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        return sums

    def _hook(self, index: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self.rerunning:
                return
            h_in = first_arg(args, kwargs)
            h_out = output[0] if isinstance(output, tuple) else output
            before, after = self._span(index, module, args, kwargs, h_in, h_out)
            self.sums[index] += float((1 - F.cosine_similarity(before, after, dim=-1)).sum())

        return hook

    def _span(self, index, module, args, kwargs, h_in, h_out):
        if self.unit == "block":
            return h_in, h_out
        self.rerunning = True
        try:
            with masked(self.ctx.model, self.ctx.adapter, [Unit(index, "mlp")]):
                mid = module(*args, **kwargs)
        finally:
            self.rerunning = False
        mid = mid[0] if isinstance(mid, tuple) else mid
        return (h_in, mid) if self.unit == "attn" else (mid, h_out)
