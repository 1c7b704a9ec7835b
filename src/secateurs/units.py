"""Depth units (a block, or its attention / MLP branch) and masking them without surgery.

Masking installs forward hooks, inside a context manager so they are removed on error. A masked
block returns its input; a masked branch contributes nothing to the residual stream. The masked
model is the reference that physical surgery must reproduce exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter, SubBlock
from secateurs.errors import ConfigError

DEPTH_UNITS = ("block", "attn", "mlp")


class Unit(NamedTuple):
    """One depth unit: ``kind`` ("block", "attn" or "mlp") of decoder layer ``layer``."""

    layer: int
    kind: str


def check_unit_kind(kind: str) -> str:
    if kind not in DEPTH_UNITS:
        raise ConfigError(f"Unknown depth unit {kind!r}; expected one of {', '.join(DEPTH_UNITS)}.")
    return kind


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
