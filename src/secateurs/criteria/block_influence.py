"""``block-influence``: 1 − cos(h_in, h_out) of a unit, averaged over tokens (ShortGPT).

Uses the unit's own input and output on the residual stream. For a branch, the stream is taken
just before and just after the branch is added: the layer is re-run with its MLP masked to get
the state between attention and MLP (exact for sequential pre-norm blocks; for parallel-residual
blocks it is the attention branch's share of the update).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Layerwise, Observer, ScoringContext
from secateurs.units.depth import Unit, first_arg, masked


@CRITERIA.register("block-influence", aliases=("bi", "shortgpt"))
class BlockInfluence(Layerwise):
    name = "block-influence"
    units = frozenset({"block", "attn", "mlp"})
    summary = "mean over tokens of 1 − cos(stream before, stream after) the unit (ShortGPT)"

    def observer(self, ctx: ScoringContext, kind: str, layer: int) -> StreamChange:
        return StreamChange(ctx, kind, layer)

    def layer_score(
        self, ctx: ScoringContext, kind: str, layer: int, observed: StreamChange
    ) -> torch.Tensor:
        return torch.tensor(observed.total / observed.tokens, dtype=torch.float64)


class StreamChange(Observer):
    """Σ over tokens of 1 − cos(stream before, stream after) one unit of one layer."""

    def __init__(self, ctx: ScoringContext, unit: str, layer: int) -> None:
        self.ctx, self.unit, self.layer = ctx, unit, layer
        self.module = ctx.adapter.layers(ctx.model)[layer]
        self.total, self.tokens = 0.0, 0
        self.rerunning = False

    @contextmanager
    def attached(self) -> Iterator[None]:
        handle = self.module.register_forward_hook(self._hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.rerunning:
            return
        h_in = first_arg(args, kwargs)
        h_out = output[0] if isinstance(output, tuple) else output
        before, after = self._span(module, args, kwargs, h_in, h_out)
        self.total += float((1 - F.cosine_similarity(before, after, dim=-1)).sum())
        self.tokens += h_in.shape[:-1].numel()

    def _span(self, module, args, kwargs, h_in, h_out):
        if self.unit == "block":
            return h_in, h_out
        self.rerunning = True
        try:
            with masked(self.ctx.model, self.ctx.adapter, [Unit(self.layer, "mlp")]):
                mid = module(*args, **kwargs)
        finally:
            self.rerunning = False
        mid = mid[0] if isinstance(mid, tuple) else mid
        return (h_in, mid) if self.unit == "attn" else (mid, h_out)
