"""Apply a plan: drop decoder layers or replace branches, and keep the config consistent.

Surgery edits the model in place (no copy of the weights). After removing blocks every module's
``layer_idx`` is renumbered and per-layer config lists are sliced, so ``generate()`` with a KV
cache addresses the right cache slot.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from secateurs.adapters import Adapter, adapter_for
from secateurs.plan import Plan
from secateurs.units import Unit, branch_zero, first_arg

log = logging.getLogger(__name__)


class SkippedBranch(nn.Module):
    """Stands in for a removed attention or MLP branch: no weights, zero contribution.

    A removed attention still advances the KV cache by the step's length (with zero heads, so
    no memory), because transformers reads sequence lengths and mask sizes from the cache.
    """

    def __init__(self, kind: str, returns_tuple: bool, residual_arg: int | None, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.returns_tuple = returns_tuple
        self.residual_arg = residual_arg
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = branch_zero(self.residual_arg, args, kwargs)
        if not self.returns_tuple:
            return out
        self._advance_cache(first_arg(args, kwargs), [*args, *kwargs.values()])
        return out, None

    def _advance_cache(self, hidden: torch.Tensor, candidates: list[Any]) -> None:
        cache = next((c for c in candidates if isinstance(c, Cache)), None)
        if cache is None:
            return
        batch, length = hidden.shape[0], hidden.shape[1]
        empty = hidden.new_zeros(batch, 0, length, 1)  # (B, heads=0, T, head_dim)
        cache.update(empty, empty, self.layer_idx)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layer_idx={self.layer_idx}"


def apply_plan(
    model: PreTrainedModel, plan: Plan, adapter: Adapter | None = None
) -> PreTrainedModel:
    """Physically remove the plan's units from ``model`` (in place) and return it."""
    adapter = adapter or adapter_for(model)
    if adapter.num_layers(model) != plan.num_layers:
        raise ValueError(
            f"Plan is for {plan.num_layers} layers but the model has {adapter.num_layers(model)}."
        )
    for unit in plan.units:
        if unit.kind != "block":
            skip_branch(model, adapter, unit)
    if plan.blocks:
        remove_blocks(model, adapter, plan.blocks)
    return model


def skip_branch(model: PreTrainedModel, adapter: Adapter, unit: Unit) -> None:
    """Replace one branch by ``SkippedBranch`` and its companions (norms, fc1) by identities."""
    block = adapter.layers(model)[unit.layer]
    branch = adapter.sub_block(unit.kind, model.config)
    skipped = SkippedBranch(unit.kind, branch.returns_tuple, branch.residual_arg, unit.layer)
    _set_submodule(block, branch.output, skipped)
    for name in branch.companions:
        _set_submodule(block, name, nn.Identity())
    log.info("layer %d: %s branch removed", unit.layer, unit.kind)


def remove_blocks(model: PreTrainedModel, adapter: Adapter, blocks: tuple[int, ...]) -> None:
    layers = adapter.layers(model)
    old_count = len(layers)
    kept_indices = [i for i in range(old_count) if i not in set(blocks)]
    kept = [layers[i] for i in kept_indices]
    adapter.set_layers(model, nn.ModuleList(kept))
    renumber_layers(adapter.layers(model))
    update_layer_config(model, adapter, kept_indices)
    log.info("num_hidden_layers: %d -> %d (removed %s)", old_count, len(kept), list(blocks))


def renumber_layers(layers: nn.ModuleList) -> None:
    """Point every module's ``layer_idx`` (KV-cache slot) at its layer's new position."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


def update_layer_config(model: PreTrainedModel, adapter: Adapter, kept: list[int]) -> None:
    config = model.config
    old_count = config.num_hidden_layers
    for key in adapter.per_layer_config_keys:
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, key, [values[i] for i in kept])
            log.info("config.%s sliced to the %d kept layers", key, len(kept))
    adapter.remap_layer_config(config, kept)
    config.num_hidden_layers = len(kept)


def _set_submodule(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_path, _, attr = dotted.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, module)


def skipped_branches(model: PreTrainedModel, adapter: Adapter | None = None) -> list[Unit]:
    """The branches of ``model`` that are ``SkippedBranch`` (in current layer numbering)."""
    adapter = adapter or adapter_for(model)
    found = []
    for index, layer in enumerate(adapter.layers(model)):
        for kind in ("attn", "mlp"):
            branch = adapter.sub_block(kind, model.config)
            if isinstance(layer.get_submodule(branch.output), SkippedBranch):
                found.append(Unit(index, kind))
    return found
