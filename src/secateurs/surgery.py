"""Apply a plan: cut experts and widths, replace branches, drop decoder layers; keep the config
consistent. ``apply_plan`` is the one entry for every kind of plan.

Surgery edits the model in place (no copy of the weights). After removing blocks every module's
``layer_idx`` is renumbered and per-layer config lists are sliced, so ``generate()`` with a KV
cache addresses the right cache slot.

Some families compute constants from a layer's *index* when the model is built, so a kept layer
renumbered from 7 to 4 would be rebuilt differently on reload. Each such constant is kept exact:
- per-layer lists (``layer_types``, ``no_rope_layers``, ``mlp_layer_types``) are sliced;
- index lists (``mlp_only_layers``) are renumbered, a ``decoder_sparse_step`` pattern becomes an
  explicit ``mlp_only_layers`` list, dense-prefix counts (``first_k_dense_replace``,
  ``num_dense_layers``) count the kept dense layers;
- GPT-2's ``scale_attn_by_inverse_layer_idx`` (scores divided by index + 1) is folded into the
  query weights, so the layer's new index gives the old scaling.
Anything else a reload would rebuild differently is refused when saving (``checkpoint.py``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from secateurs.adapters import Adapter, adapter_for
from secateurs.adapters.base import WIDTH_KINDS
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.plan import Plan
from secateurs.units import Unit, branch_zero, first_arg
from secateurs.width import add_output_bias, compensate, prune_layer, update_config, widths

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
    model: PreTrainedModel,
    plan: Plan,
    adapter: Adapter | None = None,
    means: dict[str, list[torch.Tensor]] | None = None,
) -> PreTrainedModel:
    """Physically remove every unit of ``plan`` from ``model`` (in place) and return it.

    The one surgery entry for every kind: experts and widths first, while the layers still have
    their original indices (the plan's), then branches, then blocks. ``means`` are the output
    projections' mean inputs that a compensating width plan folds into the biases.
    """
    adapter = adapter or adapter_for(model)
    if adapter.num_layers(model) != plan.num_layers:
        raise ConfigError(
            f"Plan is for {plan.num_layers} layers but the model has {adapter.num_layers(model)}."
        )
    if plan.has_experts:
        from secateurs.experts import apply_expert_plan

        apply_expert_plan(model, plan, adapter)
    if plan.has_widths:
        apply_width_plan(model, plan, adapter, means)
    for unit in plan.units:
        if unit.kind != "block":
            skip_branch(model, adapter, unit)
    if plan.blocks:
        remove_blocks(model, adapter, plan.blocks)
    return model


def apply_width_plan(
    model: PreTrainedModel,
    plan: Plan,
    adapter: Adapter | None = None,
    means: dict[str, list[torch.Tensor]] | None = None,
) -> bool:
    """Cut ``plan``'s head groups and channels out of ``model`` in place; True if a plain
    config describes the result.

    With ``plan.compensate``, ``means[kind][layer]`` (the output projection's mean input) is
    folded into its bias first: b += W[:, removed] · mean[removed].
    """
    adapter = adapter or adapter_for(model)
    original = widths(model, adapter)[0]
    prepare_compensation(model, adapter, plan, means)
    for index in range(plan.num_layers):
        cut_layer(model, adapter, plan, index, means)
    return update_config(model, adapter, original)


def prepare_compensation(
    model: PreTrainedModel,
    adapter: Adapter,
    plan: Plan,
    means: dict[str, list[torch.Tensor]] | None,
) -> None:
    """For ``plan.compensate``: check the input means are there, add the zero biases."""
    if not plan.compensate:
        return
    for kind in WIDTH_KINDS:
        if any(plan.removed(kind)):
            if kind not in (means or {}):
                raise ConfigError(f"Compensation needs the {kind} input means from the criterion.")
            add_output_bias(model, adapter, kind)


def cut_layer(
    model: PreTrainedModel,
    adapter: Adapter,
    plan: Plan,
    index: int,
    means: dict[str, list[torch.Tensor]] | None = None,
) -> None:
    """Slice layer ``index``'s removed head groups / channels, after folding their mean
    contribution into the bias if the plan compensates (``prepare_compensation`` first)."""
    for kind in WIDTH_KINDS:
        units = plan.removed(kind)[index]
        if units and plan.compensate:
            compensate(model, adapter, kind, index, units, means[kind][index])
        if units:
            prune_layer(model, adapter, index, kind, units)


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
    keep_inverse_layer_scaling(model, adapter, kept_indices)
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


PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "mlp_layer_types")


def update_layer_config(model: PreTrainedModel, adapter: Adapter, kept: list[int]) -> None:
    """Keep every layer-index dependent config value right for the kept layers (see above)."""
    config = model.config
    old_count = config.num_hidden_layers
    for key in dict.fromkeys((*adapter.per_layer_config_keys, *PER_LAYER_KEYS)):
        values = getattr(config, key, None)
        if isinstance(values, (list, tuple)) and len(values) == old_count:
            setattr(config, key, [values[i] for i in kept])
            log.info("config.%s sliced to the %d kept layers", key, len(kept))
    adapter.remap_layer_config(config, kept)
    config.num_hidden_layers = len(kept)


def keep_inverse_layer_scaling(model: PreTrainedModel, adapter: Adapter, kept: list[int]) -> None:
    """GPT-2 ``scale_attn_by_inverse_layer_idx``: scores are scaled by 1 / (index + 1), fixed
    from the index at construction. Fold (new + 1) / (old + 1) into the query projection and
    give the module the scaling of its new index, so memory and a reload agree exactly."""
    if not getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        return
    layout = adapter.heads
    if layout is None or (layout.qkv and layout.fused != "stacked"):
        raise UnsupportedModelError(
            f"{adapter.name}: scale_attn_by_inverse_layer_idx needs the query projection's "
            "location to keep each layer's scaling after block removal."
        )
    layers = adapter.layers(model)
    for new, old in enumerate(kept):
        attention = layers[old].get_submodule(layout.attention)
        if new == old or isinstance(attention, SkippedBranch):
            continue
        factor = (new + 1) / (old + 1)
        _scale_queries(layers[old], layout, attention, factor)
        attention.scaling /= factor


@torch.no_grad()
def _scale_queries(block: nn.Module, layout: Any, attention: nn.Module, factor: float) -> None:
    """Multiply the query projection (weight and bias) of one layer by ``factor``."""
    if not layout.qkv:
        projection = block.get_submodule(layout.q)
        projection.weight.mul_(factor)
        if projection.bias is not None:
            projection.bias.mul_(factor)
        return
    projection = block.get_submodule(layout.qkv)
    width = attention.num_heads * attention.head_dim  # query part of the stacked [Q | K | V]
    weight = projection.weight
    (weight[:, :width] if layout.conv1d else weight[:width]).mul_(factor)
    if projection.bias is not None:
        projection.bias[:width].mul_(factor)


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
