"""Unit kinds, the only place with per-kind knowledge: how to mask them (the reference), cut
them out of one layer, and what a model's config must say afterwards.

- ``depth``: blocks and attention / MLP branches;
- ``width``: KV head groups and MLP channels;
- ``experts``: routed experts of mixture-of-experts layers.

A plan is cut layer by layer (``Cut``: ``layer(i)`` for every layer, in any order, then
``finish()``), because that is how a model read from disk one layer at a time is cut; in memory
``apply_plan`` runs the same steps. Every index is the original model's: experts and widths are
cut while the layers still have their numbers, branches next, blocks dropped last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch

from secateurs.adapters import Adapter, adapter_for
from secateurs.errors import ConfigError
from secateurs.plan import Plan
from secateurs.units import depth, experts, width

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PreTrainedModel

WIDTH_KINDS = ("heads", "channels")
Means = dict[
    str, list[torch.Tensor]
]  # per width kind and layer: the output projection's mean input


class Cut:
    """Cutting ``plan`` out of ``model`` one layer at a time.

    ``means`` (per width kind, per layer: the output projection's mean input) fold the removed
    units' mean contribution into the bias where the plan compensates (FLAP)."""

    def __init__(
        self, model: PreTrainedModel, plan: Plan, adapter: Adapter | None = None, means=None
    ) -> None:
        self.model, self.plan = model, plan
        self.adapter = adapter or adapter_for(model)
        self.means = means or {}
        if self.adapter.num_layers(model) != plan.num_layers:
            raise ConfigError(
                f"Plan is for {plan.num_layers} layers but the model has "
                f"{self.adapter.num_layers(model)}."
            )
        self.original = width.widths(model, self.adapter)[0] if plan.has_widths else None
        if plan.has_experts:
            experts.check_expert_plan(model, self.adapter, plan)
        self._prepare_compensation()

    def _prepare_compensation(self) -> None:
        if not self.plan.compensate:
            return
        for kind in WIDTH_KINDS:
            if any(self.plan.removed(kind)):
                if kind not in self.means:
                    raise ConfigError(f"Compensation needs the {kind} input means of the windows.")
                width.add_output_bias(self.model, self.adapter, kind)

    def touches(self, index: int) -> bool:
        """Whether layer ``index`` loses anything but its whole block."""
        plan = self.plan
        return any(
            [
                index in plan.attn or index in plan.mlp,
                *(plan.removed(kind)[index] for kind in (*WIDTH_KINDS, "experts")),
            ]
        )

    def layer(
        self,
        index: int,
        widths: Sequence[str] = WIDTH_KINDS,
        branches: Sequence[str] = ("attn", "mlp"),
    ) -> None:
        """Cut layer ``index`` (loaded): its experts, its ``widths`` kinds and its removed
        ``branches`` (a fit may do some of these itself, or need a branch a little longer)."""
        gone = self.plan.removed("experts")[index]
        if gone and "mlp" in branches:
            experts.prune_layer_experts(self.model, self.adapter, index, gone)
        for kind in widths:
            self.width_layer(index, kind)
        for kind in branches:
            if index in getattr(self.plan, kind):
                depth.skip_branch(self.model, self.adapter, depth.Unit(index, kind))

    def width_layer(self, index: int, kind: str) -> None:
        units = self.plan.removed(kind)[index]
        if not units:
            return
        if self.plan.compensate:
            mean = self.means[kind][index]
            width.compensate(self.model, self.adapter, kind, index, units, mean)
        width.prune_layer(self.model, self.adapter, index, kind, units)

    def finish(self) -> bool:
        """Update the config for what was cut and drop the removed blocks; True if the
        config alone describes the result (widths and expert counts alike in every layer)."""
        plain = True
        if self.plan.has_experts:
            plain = experts.update_expert_config(self.model, self.adapter) and plain
        if self.original is not None:
            plain = width.update_config(self.model, self.adapter, self.original) and plain
        if self.plan.blocks:
            depth.remove_blocks(self.model, self.adapter, self.plan.blocks)
        return plain


def apply_plan(
    model: PreTrainedModel, plan: Plan, adapter: Adapter | None = None, means: Means | None = None
) -> PreTrainedModel:
    """Physically remove every unit of ``plan`` from ``model`` (in place) and return it."""
    cut = Cut(model, plan, adapter, means)
    for index in range(plan.num_layers):
        cut.layer(index)
    cut.finish()
    return model


@contextmanager
def masked(model: PreTrainedModel, plan: Plan, adapter: Adapter | None = None) -> Iterator[None]:
    """Run ``model`` as if ``plan`` were cut (the reference the cut must reproduce)."""
    adapter = adapter or adapter_for(model)
    with ExitStack() as stack:
        if plan.has_experts:
            removed = plan.removed_by_layer()
            stack.enter_context(experts.experts_masked(model, adapter, removed))
        if plan.has_widths:
            removed = {kind: plan.removed(kind) for kind in WIDTH_KINDS}
            stack.enter_context(width.width_masked(model, adapter, removed))
        stack.enter_context(depth.masked(model, adapter, plan.units))
        yield


def unit_cost(model: PreTrainedModel, adapter: Adapter, layer: int, kind: str) -> int:
    """Parameters one unit of ``kind`` in ``layer`` takes away."""
    if kind in WIDTH_KINDS:
        return width.unit_cost(model, adapter, layer, kind)
    if kind == "experts":
        return experts.expert_cost(model, adapter, layer)
    modules = adapter.unit_modules(model, layer, kind)
    return sum(p.numel() for m in modules for p in m.parameters())


def unit_count(model: PreTrainedModel, adapter: Adapter, layer: int, kind: str) -> int:
    """How many units of ``kind`` layer ``layer`` has (1 for a depth kind)."""
    if kind in WIDTH_KINDS:
        return width.layer_width(adapter, adapter.layers(model)[layer]).count(kind)
    if kind == "experts":
        return experts.num_experts(model, adapter, layer)
    return 1


__all__ = ["Cut", "apply_plan", "depth", "experts", "masked", "unit_cost", "unit_count", "width"]
