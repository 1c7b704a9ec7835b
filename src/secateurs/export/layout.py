"""The shape of a (pruned) checkpoint, read from its config and ``secateurs.json`` alone.

Exporters decide what they can express from a ``Layout`` before any weight is loaded, so a
refusal costs nothing. After loading, ``check_model`` holds the weights to the same layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.checkpoint import read_record, recorded_structure, unmarked_config_dict
from secateurs.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Families whose blocks are LLaMA's (RMSNorm, SwiGLU MLP, rotary attention without biases other
# than the optional attention_bias / mlp_bias): what DeciLM and llama.cpp's deci graph compute.
LLAMA_FAMILY = ("llama",)


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: query heads, KV heads and MLP channels (0 where the branch is gone)."""

    heads: int
    kv_heads: int
    channels: int

    @property
    def has_attention(self) -> bool:
        return self.heads > 0

    @property
    def has_mlp(self) -> bool:
        return self.channels > 0


@dataclass(frozen=True)
class Layout:
    """What an exporter needs to know about a checkpoint, without its weights."""

    config: dict[str, Any]
    layers: tuple[LayerShape, ...]  # empty for families other than LLaMA's
    plain: bool = True  # the config alone describes every shape (no secateurs structure)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_attention_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // self.num_attention_heads)

    @property
    def removed_branches(self) -> bool:
        return any(not (s.has_attention and s.has_mlp) for s in self.layers)

    @property
    def uniform(self) -> bool:
        """One shape for every layer and no removed branch: a plain config describes it."""
        return len(set(self.layers)) == 1 and not self.removed_branches

    def attention_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s.has_attention]

    def query_heads(self) -> set[int]:
        """Distinct query-head counts over the layers that keep attention."""
        return {s.heads for s in self.layers if s.has_attention}


def read_layout(directory: str | Path) -> Layout:
    """The layout of an HF checkpoint directory (secateurs-written or plain)."""
    directory = Path(directory)
    config = unmarked_config_dict(directory)
    structure = read_record(directory).get("structure", {})
    plain = not recorded_structure(directory)
    if config.get("model_type") not in LLAMA_FAMILY:
        return Layout(config, (), plain)
    n = int(config["num_hidden_layers"])
    widths = structure.get("widths") or _config_widths(config, n)
    skipped = {(int(layer), kind) for layer, kind in structure.get("skipped_branches", [])}
    layers = []
    for i in range(n):
        attn, mlp = (i, "attn") not in skipped, (i, "mlp") not in skipped
        heads = int(widths["heads"][i]) if attn else 0
        kv = int(widths["kv_heads"][i]) if attn else 0
        layers.append(LayerShape(heads, kv, int(widths["channels"][i]) if mlp else 0))
    return Layout(config, tuple(layers), plain)


def _config_widths(config: dict[str, Any], n: int) -> dict[str, list[int]]:
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    return {
        "heads": [heads] * n,
        "kv_heads": [kv] * n,
        "channels": [config["intermediate_size"]] * n,
    }


def check_family(layout: Layout, fmt: str) -> None:
    """Refuse families whose blocks the target format does not compute."""
    if layout.model_type not in LLAMA_FAMILY:
        raise UnsupportedModelError(
            f"--to {fmt} writes LLaMA-style blocks; {layout.model_type!r} is not one "
            f"(supported: {', '.join(LLAMA_FAMILY)}). Use --to hf where its shapes are uniform."
        )
    rope = layout.config.get("rope_parameters") or layout.config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UnsupportedModelError(
            f"--to {fmt}: rope_type {rope.get('rope_type')!r} is not supported (default, llama3)."
        )


def layer_shapes(model: PreTrainedModel) -> tuple[LayerShape, ...]:
    """Per-layer shapes read from a loaded model's weights."""
    from secateurs.adapters import adapter_for
    from secateurs.units.width import widths

    return tuple(
        LayerShape(w.heads, w.kv_heads if w.heads else 0, w.channels)
        for w in widths(model, adapter_for(model))
    )


def check_model(model: PreTrainedModel, layout: Layout) -> None:
    """The loaded weights have exactly the layout the exporter planned for."""
    if not layout.layers:
        return
    actual = layer_shapes(model)
    if actual != layout.layers:
        bad = next(i for i, (a, b) in enumerate(zip(actual, layout.layers, strict=True)) if a != b)
        raise UnsupportedModelError(
            f"Layer {bad}: weights have {actual[bad]}, the config/record say {layout.layers[bad]}."
        )
