"""Width units (attention head groups, MLP channels): their weight slices, masking and surgery.

A *head group* is one KV head and the query heads sharing it (GQA), or one head (MHA): removing
whole groups keeps ``num_attention_heads % num_key_value_heads == 0``. A *channel* is one MLP
intermediate index across the input projections' rows and the output projection's column.

Everything here asks the adapter's ``HeadLayout`` / ``ChannelLayout`` for module names, so a
criterion can score groups without knowing them: ``group_slices`` gives, per layer, each
group's rows/columns of every weight, and ``output_projection`` the module whose *input* holds
one column block per group (o_proj / down_proj), for activation statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from secateurs.adapters import Adapter
from secateurs.adapters.base import WIDTH_KINDS, ChannelLayout, HeadLayout
from secateurs.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerWidth:
    """Current widths of one layer: query heads, KV heads, head size and MLP channels."""

    heads: int
    kv_heads: int
    head_dim: int
    channels: int

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    def count(self, kind: str) -> int:
        """Number of width units of ``kind`` (head groups or channels)."""
        return self.kv_heads if kind == "heads" else self.channels


@dataclass(frozen=True)
class ParamSlice:
    """Rows (``dim=0``) or columns (``dim=1``) of one parameter, per group.

    ``index`` is (groups, members): group g owns ``param.index_select(dim, index[g])``. A bias
    appears as its own slice with ``dim=0``.
    """

    name: str
    param: nn.Parameter
    dim: int
    index: torch.Tensor

    def per_group(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` shaped like ``param``, regrouped to (groups, members, rest)."""
        picked = values.index_select(self.dim, self.index.flatten().to(values.device))
        picked = picked.movedim(self.dim, 0)
        return picked.reshape(*self.index.shape, -1)

    def cost(self) -> int:
        """Parameters one group owns in this slice."""
        return self.index.shape[1] * (self.param.numel() // self.param.shape[self.dim])


# --- reading widths ---------------------------------------------------------------------------
def _linear_dims(module: nn.Module, conv1d: bool) -> tuple[int, int]:
    """(in, out) features of a Linear or a GPT-2 Conv1D (weight (in, out))."""
    weight = module.weight
    return (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])


def layer_width(adapter: Adapter, layer: nn.Module) -> LayerWidth:
    """Read the current widths of ``layer`` from its weight shapes."""
    heads = kv = head_dim = channels = 0
    h, c = adapter.heads, adapter.channels
    try:  # a removed branch (depth pruning) has no projections: width 0
        if h is not None:
            head_dim = int(getattr(layer.get_submodule(h.attention), h.head_dim_attr))
            heads = _linear_dims(layer.get_submodule(h.o), h.conv1d)[0] // head_dim
            kv = _kv_heads(h, layer, heads, head_dim)
    except AttributeError:
        heads = kv = head_dim = 0
    try:
        if c is not None:
            channels = _linear_dims(layer.get_submodule(c.output), c.conv1d)[0]
    except AttributeError:
        channels = 0
    return LayerWidth(heads, kv, head_dim, channels)


def _kv_heads(h: HeadLayout, layer: nn.Module, heads: int, head_dim: int) -> int:
    if h.fused == "interleaved" or h.kv_heads_key is None:
        return heads
    if h.qkv:
        out = _linear_dims(layer.get_submodule(h.qkv), h.conv1d)[1]
        return (out - heads * head_dim) // (2 * head_dim)
    return _linear_dims(layer.get_submodule(h.k), h.conv1d)[1] // head_dim


def widths(model: PreTrainedModel, adapter: Adapter) -> list[LayerWidth]:
    return [layer_width(adapter, layer) for layer in adapter.layers(model)]


# --- index maps -------------------------------------------------------------------------------
def _blocks(starts: torch.Tensor, size: int) -> torch.Tensor:
    """(len(starts), size) index rows ``start + arange(size)``."""
    return starts[:, None] + torch.arange(size)[None, :]


def query_heads_of(groups: torch.Tensor, width: LayerWidth) -> torch.Tensor:
    """Query-head indices (groups, group_size) of KV groups ``groups``."""
    return _blocks(groups * width.group_size, width.group_size)


def head_columns(groups: torch.Tensor, width: LayerWidth) -> torch.Tensor:
    """o_proj input columns (groups, group_size * head_dim) of ``groups``."""
    heads = query_heads_of(groups, width)
    cols = _blocks(heads.flatten() * width.head_dim, width.head_dim)
    return cols.reshape(len(groups), -1)


def _qkv_rows(h: HeadLayout, groups: torch.Tensor, w: LayerWidth) -> dict[str, torch.Tensor]:
    """Output rows of the q/k/v projections (or of the fused qkv) owned by each group."""
    d = w.head_dim
    q = head_columns(groups, w)
    kv = _blocks(groups * d, d)
    if h.fused == "interleaved":  # MHA only: head g owns rows [3d·g, 3d·(g+1))
        return {h.qkv: _blocks(groups * 3 * d, 3 * d)}
    if h.fused == "stacked":
        k_off, v_off = w.heads * d, (w.heads + w.kv_heads) * d
        return {h.qkv: torch.cat([q, kv + k_off, kv + v_off], dim=1)}
    return {h.q: q, h.k: kv, h.v: kv}


def _channel_rows(
    c: ChannelLayout, channels: torch.Tensor, w: LayerWidth
) -> dict[str, torch.Tensor]:
    idx = channels[:, None]
    if c.gate_up:
        return {c.gate_up: torch.cat([idx, idx + w.channels], dim=1)}
    return {name: idx for name in c.inputs}


def unit_index_maps(
    adapter: Adapter, kind: str, units: torch.Tensor, width: LayerWidth
) -> tuple[dict[str, torch.Tensor], tuple[str, torch.Tensor], bool]:
    """For ``units`` of ``kind``: ({input module: out rows}, (output module, in cols), conv1d)."""
    layout = adapter.width_layout(kind)
    if isinstance(layout, HeadLayout):
        cols = head_columns(units, width)
        return _qkv_rows(layout, units, width), (layout.o, cols), layout.conv1d
    cols = units[:, None]
    return _channel_rows(layout, units, width), (layout.output, cols), layout.conv1d


def group_slices(
    model: PreTrainedModel, adapter: Adapter, layer: int, kind: str
) -> list[ParamSlice]:
    """Every weight/bias slice of each ``kind`` group of ``layer`` (all groups, in order).

    Rows of input projections (weights and biases) and columns of the output projection;
    Conv1D weights are addressed on their transposed axes, so ``dim`` is as stored.
    """
    block = adapter.layers(model)[layer]
    width = layer_width(adapter, block)
    units = torch.arange(width.count(kind))
    rows, (out_name, cols), conv1d = unit_index_maps(adapter, kind, units, width)
    slices = []
    for name, index in rows.items():
        module = block.get_submodule(name)
        slices.append(ParamSlice(f"{name}.weight", module.weight, 1 if conv1d else 0, index))
        if module.bias is not None:
            slices.append(ParamSlice(f"{name}.bias", module.bias, 0, index))
    out = block.get_submodule(out_name)
    slices.append(ParamSlice(f"{out_name}.weight", out.weight, 0 if conv1d else 1, cols))
    return slices


def output_projection(
    model: PreTrainedModel, adapter: Adapter, layer: int, kind: str
) -> tuple[nn.Module, torch.Tensor]:
    """The o_proj/down_proj of ``layer`` and its input columns per group (groups, members)."""
    block = adapter.layers(model)[layer]
    width = layer_width(adapter, block)
    units = torch.arange(width.count(kind))
    _, (name, cols), _ = unit_index_maps(adapter, kind, units, width)
    return block.get_submodule(name), cols


def output_weight_columns(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """The output projection's weight as (out, in), whatever its storage."""
    return module.weight.t() if conv1d else module.weight


def unit_cost(model: PreTrainedModel, adapter: Adapter, layer: int, kind: str) -> int:
    """Parameters removed with one ``kind`` unit of ``layer``."""
    return sum(s.cost() for s in group_slices(model, adapter, layer, kind))


# --- masking (the reference surgery must reproduce) -------------------------------------------
@contextmanager
def width_masked(
    model: PreTrainedModel,
    adapter: Adapter,
    removed: Mapping[str, Sequence[Sequence[int]]],
    fill: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
) -> Iterator[None]:
    """Run ``model`` as if the ``removed[kind][layer]`` units contributed nothing.

    A forward pre-hook on each output projection zeros the input columns of removed units (or
    sets them to ``fill[kind][layer]``, a full-width vector, for FLAP's mean compensation).
    """
    handles = []
    try:
        for kind, per_layer in removed.items():
            for layer, units in enumerate(per_layer):
                if len(units) == 0:
                    continue
                module, cols = output_projection(model, adapter, layer, kind)
                cols = cols[torch.as_tensor(list(units), dtype=torch.long)].flatten()
                value = None if fill is None else fill[kind][layer]
                handles.append(module.register_forward_pre_hook(_mask_hook(cols, value)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _mask_hook(cols: torch.Tensor, value: torch.Tensor | None):
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x[..., cols] = 0 if value is None else value[cols].to(x.dtype)
        return (x, *args[1:])

    return hook


# --- surgery ----------------------------------------------------------------------------------
def keep_index(count: int, removed: Sequence[int]) -> torch.Tensor:
    gone = set(int(i) for i in removed)
    return torch.tensor([i for i in range(count) if i not in gone], dtype=torch.long)


def slice_param(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    """Replace ``module.attr`` by its ``index`` slice along ``dim`` (keeps requires_grad)."""
    old = getattr(module, attr)
    new = old.detach().index_select(dim, index.to(old.device)).contiguous()
    setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))


def _slice_linear(module: nn.Module, index: torch.Tensor, out: bool, conv1d: bool) -> None:
    """Keep output rows (``out``) or input columns of a Linear / Conv1D."""
    dim = (1 if conv1d else 0) if out else (0 if conv1d else 1)
    slice_param(module, "weight", dim, index)
    if out and module.bias is not None:
        slice_param(module, "bias", 0, index)
    in_f, out_f = _linear_dims(module, conv1d)
    if conv1d:
        module.nf = out_f
        module.nx = in_f
    else:
        module.in_features, module.out_features = in_f, out_f


def prune_layer(
    model: PreTrainedModel, adapter: Adapter, layer: int, kind: str, removed: Sequence[int]
) -> LayerWidth:
    """Physically remove ``removed`` units of ``kind`` from ``layer``; returns the new width."""
    adapter.width_layout(kind, model.config)  # a variant that cannot prune kind → clear error
    block = adapter.layers(model)[layer]
    width = layer_width(adapter, block)
    keep = keep_index(width.count(kind), removed)
    if len(keep) == 0:
        raise ConfigError(f"Layer {layer}: removing every {kind} unit would empty it.")
    rows, (out_name, cols), conv1d = unit_index_maps(adapter, kind, keep, width)
    # Kept rows/columns stay in their original order, which keeps every fused layout intact.
    for name, index in rows.items():
        _slice_linear(block.get_submodule(name), index.flatten().sort().values, True, conv1d)
    _slice_linear(block.get_submodule(out_name), cols.flatten().sort().values, False, conv1d)
    new = layer_width(adapter, block)
    if kind == "heads":
        _set_head_attrs(adapter, block, new)
    return new


def _set_head_attrs(adapter: Adapter, block: nn.Module, w: LayerWidth) -> None:
    h = adapter.heads
    attention = block.get_submodule(h.attention)
    for attr, quantity in h.attrs:
        if quantity == "config":
            private = copy.copy(attention.config)
            _set_head_config(private, h, w)
            attention.config = private  # this layer's own head counts (Phi-3 reads them)
        else:
            value = {"heads": w.heads, "kv_heads": w.kv_heads, "q_width": w.heads * w.head_dim}
            setattr(attention, attr, value[quantity])


def _set_head_config(config, h: HeadLayout, w: LayerWidth) -> None:
    if h.head_dim_key:
        setattr(config, h.head_dim_key, w.head_dim)
    setattr(config, h.heads_key, w.heads)
    if h.kv_heads_key:
        setattr(config, h.kv_heads_key, w.kv_heads)


def expressible(adapter: Adapter, ws: Sequence[LayerWidth], original: LayerWidth) -> bool:
    """Can a plain config describe these widths (all layers equal, keys exist)?"""
    if len(set(ws)) > 1:
        return False
    w = ws[0]
    heads_ok = (
        adapter.heads is None
        or adapter.heads.head_dim_key is not None
        or ((w.heads, w.kv_heads) == (original.heads, original.kv_heads))
    )
    channels_ok = (
        adapter.channels is None
        or adapter.channels.size_key is not None
        or (w.channels == original.channels)
    )
    return heads_ok and channels_ok


def _config_accepts(config, adapter: Adapter, w: LayerWidth) -> bool:
    """Whether the family's own config validation accepts these widths (LLaMA's refuses
    hidden sizes that are not a multiple of the head count, even with an explicit head_dim:
    Llama-3 shapes with 6 of 8 KV groups kept)."""
    if adapter.heads is None:
        return True
    from huggingface_hub.errors import StrictDataclassError

    trial = copy.deepcopy(config)
    _set_head_config(trial, adapter.heads, w)
    validate = getattr(trial, "validate", None)
    try:
        if validate is not None:
            validate()
    except (ValueError, TypeError, StrictDataclassError) as err:
        log.info("config validation: %s", err)
        return False
    return True


def update_config(model: PreTrainedModel, adapter: Adapter, original: LayerWidth) -> bool:
    """Write uniform widths into the config (old → new logged); False if not expressible."""
    ws = widths(model, adapter)
    if not expressible(adapter, ws, original):
        log.info("per-layer widths are not expressible in a plain config: secateurs reloads them")
        return False
    w, config = ws[0], model.config
    if not _config_accepts(config, adapter, w):
        log.info("transformers refuses a config with these widths: secateurs reloads them")
        return False
    if adapter.heads is not None and (w.heads, w.kv_heads) != (original.heads, original.kv_heads):
        log.info(
            "config heads: %d/%d -> %d/%d (head_dim %d)",
            original.heads,
            original.kv_heads,
            w.heads,
            w.kv_heads,
            w.head_dim,
        )
        _set_head_config(config, adapter.heads, w)
    if adapter.channels is not None and w.channels != original.channels:
        log.info("config.%s: %d -> %d", adapter.channels.size_key, original.channels, w.channels)
        setattr(config, adapter.channels.size_key, w.channels)
    return True


# --- bias compensation (FLAP) -----------------------------------------------------------------
def bias_flag_supported(config, flag: str | None) -> bool:
    """Whether ``flag`` is a real field of this model type's config (Mistral has none)."""
    from transformers import AutoConfig

    return bool(flag) and flag in AutoConfig.for_model(config.model_type).to_dict()


def can_add_intercept(model: PreTrainedModel, adapter: Adapter, kind: str) -> bool:
    """Whether ``kind``'s output projection has, or its config flag can add, a bias (what the
    reconstruction fit uses as its intercept)."""
    module, _ = output_projection(model, adapter, 0, kind)
    flag = adapter.width_layout(kind).bias_flag
    return module.bias is not None or bias_flag_supported(model.config, flag)


def check_compensation(model: PreTrainedModel, adapter: Adapter, kind: str) -> None:
    """Fail before any work if the output projection cannot carry a compensating bias."""
    layout = adapter.width_layout(kind)
    module, _ = output_projection(model, adapter, 0, kind)
    if module.bias is None and not bias_flag_supported(model.config, layout.bias_flag):
        raise UnsupportedModelError(
            f"{model.config.model_type}: the {kind} output projection has no bias and no config "
            f"flag adds one, so FLAP compensation cannot be saved; use compensate=false."
        )


def add_output_bias(model: PreTrainedModel, adapter: Adapter, kind: str) -> None:
    """Turn on the config's bias flag and give every projection it governs a zero bias."""
    layout = adapter.width_layout(kind)
    module, _ = output_projection(model, adapter, 0, kind)
    if module.bias is not None:
        return
    setattr(model.config, layout.bias_flag, True)
    names = _flag_modules(layout)
    for block in adapter.layers(model):
        for name in names:
            linear = block.get_submodule(name)
            if linear.bias is None:
                zeros = linear.weight.new_zeros(linear.weight.shape[0])
                linear.bias = nn.Parameter(zeros, requires_grad=linear.weight.requires_grad)
    log.info("config.%s: False -> True (zero biases on %s)", layout.bias_flag, ", ".join(names))


def _flag_modules(layout: HeadLayout | ChannelLayout) -> tuple[str, ...]:
    if isinstance(layout, HeadLayout):
        return tuple(n for n in (layout.q, layout.k, layout.v, layout.qkv, layout.o) if n)
    return (*layout.inputs, *([layout.gate_up] if layout.gate_up else []), layout.output)


@torch.no_grad()
def compensate(
    model: PreTrainedModel,
    adapter: Adapter,
    kind: str,
    layer: int,
    removed: Sequence[int],
    mean: torch.Tensor,
) -> None:
    """b += W[:, removed_cols] · mean[removed_cols] on ``layer``'s output projection (before
    slicing), so the pruned model adds the removed units' mean contribution."""
    module, cols = output_projection(model, adapter, layer, kind)
    conv1d = adapter.width_layout(kind).conv1d
    idx = cols[torch.as_tensor(list(removed), dtype=torch.long)].flatten()
    weight = output_weight_columns(module, conv1d)
    delta = weight[:, idx].to(torch.float64) @ mean[idx].to(torch.float64)
    module.bias.add_(delta.to(module.bias.dtype))


def check_kind(kind: str) -> str:
    if kind not in WIDTH_KINDS:
        raise ConfigError(f"Unknown width unit {kind!r}; expected one of {WIDTH_KINDS}.")
    return kind
