"""Architecture knowledge as data: where decoder blocks and their residual branches live.

An adapter is the only place that knows module names. Everything else (criteria, masking,
surgery) asks the adapter, so supporting a new family is one small file of names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from secateurs.errors import ConfigError, UnsupportedModelError

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PretrainedConfig, PreTrainedModel

SUB_BLOCKS = ("attn", "mlp")
WIDTH_KINDS = ("heads", "channels")


@dataclass(frozen=True)
class HeadLayout:
    """Where a decoder layer's attention heads live, for width pruning (paths relative to a layer).

    ``qkv`` names one fused projection instead of ``q``/``k``/``v``: ``fused="stacked"`` is
    ``[Q heads | K heads | V heads]`` along its output (Phi-3, GPT-2), ``"interleaved"`` is
    ``[q k v]`` per head (GPT-NeoX). ``conv1d``: GPT-2's ``Conv1D`` stores weights as (in, out).
    ``head_dim_attr`` is the attention module's head size attribute. ``attrs`` maps attention
    module attributes to the quantity they must hold after pruning ("heads", "kv_heads",
    "q_width", or "config": a private config copy with this layer's head counts).
    ``head_dim_key`` is None where the config derives head size from hidden/heads, so pruned
    heads are not expressible in a plain config. ``bias_flag`` adds the output bias (FLAP).
    """

    attention: str
    o: str
    q: str = ""
    k: str = ""
    v: str = ""
    qkv: str = ""
    fused: str = ""
    conv1d: bool = False
    head_dim_attr: str = "head_dim"
    heads_key: str = "num_attention_heads"
    kv_heads_key: str | None = "num_key_value_heads"
    head_dim_key: str | None = "head_dim"
    attrs: tuple[tuple[str, str], ...] = ()
    bias_flag: str | None = None


@dataclass(frozen=True)
class ChannelLayout:
    """Where MLP channels live: ``inputs`` are row-sliced (gate/up, fc1), ``output`` is
    column-sliced (down, fc2). ``gate_up``: one fused ``[gate | up]`` projection (Phi-3).
    ``size_key`` is the config key of the width (None: not expressible, e.g. BLOOM's 4·hidden).
    """

    output: str
    inputs: tuple[str, ...] = ()
    gate_up: str = ""
    conv1d: bool = False
    size_key: str | None = "intermediate_size"
    bias_flag: str | None = None


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts layer's routed experts live (paths relative to a layer).

    ``router``: a module whose ``weight`` has one row per expert (and ``bias``, e.g. GPT-OSS);
    its logits are ``F.linear(x, weight, bias)``. ``experts``: a module whose tensors stack the
    experts along dim 0 (transformers 5's fused layout), or a ``ModuleList`` of experts.
    ``count_key`` / ``top_k_key``: the config keys of the expert count and of top-k. Layers
    without the router (dense layers of an interleaved model) are not MoE layers. Shared experts
    are not routed and never touched.
    """

    router: str
    experts: str
    count_key: str = "num_local_experts"
    top_k_key: str = "num_experts_per_tok"
    # Whether the experts module is called as experts(hidden, top_k_index, top_k_weights), so
    # routing-based criteria (frequency, REAP) can observe it.
    observable: bool = True
    # A router attribute holding a per-expert bias added only to choose experts (DeepSeek-V3's
    # ``e_score_correction_bias``): masking an expert sets its entry to -inf as well.
    choice_bias: str = ""


@dataclass(frozen=True)
class SubBlock:
    """One residual branch (attention or MLP) of a decoder layer.

    ``output`` is the module whose output is (up to an output norm) the branch's contribution to
    the residual stream; ``companions`` are modules that serve only this branch (its pre-norm, a
    Gemma 2 post-norm, OPT's ``fc1``) and leave with it. ``returns_tuple``: the output module
    returns ``(hidden, attn_weights)``.
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
    # Config fields holding layer *indices* (Llama 4 ``moe_layers``); remapped to kept layers.
    layer_index_config_keys: tuple[str, ...] = ()
    # Width pruning knowledge; None (with a reason) where the family lacks it.
    heads: HeadLayout | None = None
    channels: ChannelLayout | None = None
    width_unsupported: str = ""
    # Routed experts (mixture-of-experts families); None for dense families.
    experts: ExpertLayout | None = None
    # Branch outputs pass through a norm before the residual add (Gemma 2/3, OLMo 2/3, EXAONE 4,
    # GLM-4): a linear correction of an output projection is not a linear change of the stream.
    output_norms: bool = False

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

    def unit_kinds(self) -> tuple[str, ...]:
        """Every unit kind this family can prune (depth always; width and experts if known)."""
        optional = (("heads", self.heads), ("channels", self.channels), ("experts", self.experts))
        return ("block", *SUB_BLOCKS, *(kind for kind, layout in optional if layout is not None))

    def remap_layer_config(self, config: PretrainedConfig, kept: list[int]) -> None:
        """After block removal (``kept``: original indices of kept layers), rewrite config
        fields that name layers by index, so a reload builds each kept layer as it was."""
        position = {old: new for new, old in enumerate(kept)}
        for key in self.layer_index_config_keys:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)):
                setattr(config, key, [position[i] for i in values if i in position])

    def parallel_residual(self, config: PretrainedConfig) -> bool:
        """Whether attention and MLP both read the block's input (not the attention's output)."""
        return False

    def experts_refusal(self, config: PretrainedConfig) -> str:
        """Why this config variant cannot remove experts ("" if it can)."""
        return ""

    def width_refusal(self, kind: str, config: PretrainedConfig | None) -> str:
        """Why this config variant cannot prune width ``kind`` ("" if it can)."""
        return ""

    # --- width --------------------------------------------------------------------------------
    def width_layout(
        self, kind: str, config: PretrainedConfig | None = None
    ) -> HeadLayout | ChannelLayout:
        """The layout of width unit ``kind`` ("heads" or "channels"), or a clear error.

        With ``config``, variants of the family that cannot prune ``kind`` are refused too.
        """
        if kind not in WIDTH_KINDS:
            raise ConfigError(f"Unknown width unit {kind!r}; expected one of {WIDTH_KINDS}.")
        layout = self.heads if kind == "heads" else self.channels
        refusal = self.width_refusal(kind, config) if layout is not None else ""
        if layout is None or refusal:
            reason = refusal or self.width_unsupported
            why = f" ({reason})" if reason else ""
            raise UnsupportedModelError(
                f"Adapter {self.name!r} has no width support for {kind}{why}."
            )
        return layout
