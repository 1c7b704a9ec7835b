"""Depth units: a block, or its attention / MLP branch. Masking them (the reference) and
cutting them (the surgery that must reproduce it).

Masking installs forward hooks, inside a context manager so they are removed on error. A masked
block returns its input; a masked branch contributes nothing to the residual stream. The cut
replaces a branch by ``SkippedBranch`` (no weights) and drops blocks at the end of a cut, when
every module's ``layer_idx`` is renumbered and per-layer config values follow the kept layers:

- per-layer lists (``layer_types``, ``no_rope_layers``, ``mlp_layer_types``) are sliced;
- index lists (``mlp_only_layers``) are renumbered, a ``decoder_sparse_step`` pattern becomes an
  explicit ``mlp_only_layers`` list, dense-prefix counts (``first_k_dense_replace``,
  ``num_dense_layers``) count the kept dense layers (the adapter's ``remap_layer_config``);
- GPT-2's ``scale_attn_by_inverse_layer_idx`` (scores divided by index + 1) is folded into the
  query weights, so the layer's new index gives the old scaling.
Anything else a reload would rebuild differently is refused when saving (``structure.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from secateurs.adapters import Adapter, SubBlock, adapter_for
from secateurs.errors import UnsupportedModelError
from secateurs.plan import Unit, check_unit_kind

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


def first_arg(args: tuple, kwargs: dict[str, Any], name: str = "hidden_states") -> torch.Tensor:
    """The hidden-states argument, whether passed positionally or by keyword."""
    return args[0] if args else kwargs[name]


def branch_zero(residual_arg: int | None, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """What a branch outputs when it contributes nothing: zeros, or its residual (BLOOM)."""
    if residual_arg is not None:
        return args[residual_arg] if len(args) > residual_arg else kwargs["residual"]
    return torch.zeros_like(first_arg(args, kwargs))


def _with_first(output: Any, first: torch.Tensor) -> Any:
    return (first, *output[1:]) if isinstance(output, tuple) else first


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _block_bypass_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    return _with_first(output, first_arg(args, kwargs))


def _branch_zero_hook(branch: SubBlock):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if branch.residual_arg is not None:
            return _with_first(output, branch_zero(branch.residual_arg, args, kwargs))
        # Zeros shaped like the output: OPT's fc2 maps the wide MLP width back to hidden size.
        return _with_first(output, torch.zeros_like(_first(output)))

    return hook


@contextmanager
def masked(model: PreTrainedModel, adapter: Adapter, units: Iterable[Unit]) -> Iterator[None]:
    """Run ``model`` as if ``units`` were removed (block → identity, branch → no contribution)."""
    layers = adapter.layers(model)
    handles = []
    try:
        for layer, kind in units:
            block = layers[layer]
            if check_unit_kind(kind) == "block":
                handles.append(block.register_forward_hook(_block_bypass_hook, with_kwargs=True))
                continue
            branch = adapter.sub_block(kind, model.config)
            module = block.get_submodule(branch.output)
            hook = _branch_zero_hook(branch)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- the cut ------------------------------------------------------------------------------------
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
        from transformers.cache_utils import Cache  # loaded by then: a model is running

        cache = next((c for c in candidates if isinstance(c, Cache)), None)
        if cache is None:
            return
        batch, length = hidden.shape[0], hidden.shape[1]
        empty = hidden.new_zeros(batch, 0, length, 1)  # (B, heads=0, T, head_dim)
        cache.update(empty, empty, self.layer_idx)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, layer_idx={self.layer_idx}"


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
