"""Architecture knowledge as data: where decoder blocks and their residual branches live.

An adapter is the only place that knows module names. Everything else (criteria, masking,
surgery) asks the adapter, so supporting a new family is one small file of names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from secateurs.errors import ConfigError

SUB_BLOCKS = ("attn", "mlp")


@dataclass(frozen=True)
class SubBlock:
    """One residual branch (attention or MLP) of a decoder layer.

    ``output`` is the module whose output is (up to an output norm) the branch's contribution to
    the residual stream; ``companions`` are modules that serve only this branch (its pre-norm, a
    Gemma 2 post-norm, OPT's ``fc1``) and leave with it. ``returns_tuple``: the output module returns ``(hidden, attn_weights)``.
    ``residual_arg``: positional index of a residual the module adds itself (BLOOM), so its
    "zero contribution" is that residual, not zeros.
    """

    output: str
    companions: tuple[str, ...] = ()
    returns_tuple: bool = False
    residual_arg: int | None = None

    def module_names(self) -> tuple[str, ...]:
        return (self.output, *self.companions)


@dataclass(frozen=True)
class Adapter:
    """Attribute and config-key names of one architecture family."""

    name: str
    model_types: tuple[str, ...]
    layers_path: str
    attn: SubBlock
    mlp: SubBlock
    # Config fields holding one entry per layer; sliced when blocks are removed.
    per_layer_config_keys: tuple[str, ...] = ("layer_types", "no_rope_layers")

    # --- blocks -------------------------------------------------------------------------------
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        module = model.get_submodule(self.layers_path)
        if not isinstance(module, nn.ModuleList):
            raise TypeError(f"{self.layers_path} of {type(model).__name__} is not a ModuleList")
        return module

    def set_layers(self, model: PreTrainedModel, layers: nn.ModuleList) -> None:
        parent_path, _, attr = self.layers_path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layers)

    def num_layers(self, model: PreTrainedModel) -> int:
        return len(self.layers(model))

    # --- sub-blocks ---------------------------------------------------------------------------
    def sub_block(self, part: str, config: PretrainedConfig) -> SubBlock:
        """The branch ``part`` ("attn" or "mlp"); ``config`` lets a family vary by variant."""
        if part == "attn":
            return self.attn
        if part == "mlp":
            return self.mlp
        raise ConfigError(f"Unknown sub-block {part!r}; expected one of {SUB_BLOCKS}.")

    def unit_modules(self, model: PreTrainedModel, layer: int, unit: str) -> list[nn.Module]:
        """Modules whose parameters make up ``unit`` ("block", "attn", "mlp") of ``layer``."""
        block = self.layers(model)[layer]
        if unit == "block":
            return [block]
        names = self.sub_block(unit, model.config).module_names()
        return [block.get_submodule(name) for name in names]

    def supports(self, model_type: str) -> bool:
        return model_type in self.model_types
