"""DeciLM / ``nemotron-nas`` configuration, written by secateurs for its exports.

A LLaMA configuration plus ``block_configs``: one entry per decoder layer with an ``attention``
and an ``ffn`` section. Engines read them as attributes (``block.attention.no_op``), so the
sections are dicts that also answer attribute access; a key that is absent (e.g. ``ffn_mult``
for a width no multiplier expresses) is absent as an attribute too.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

FFN_MULT_MULTIPLE = 256


class ConfigSection(dict):
    """A JSON object that reads as attributes; serialises as a plain dict."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError as err:
            raise AttributeError(key) from err


def block_section(data: dict[str, Any]) -> ConfigSection:
    return ConfigSection(
        attention=ConfigSection(data.get("attention", {})), ffn=ConfigSection(data.get("ffn", {}))
    )


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule: the multiple of 256 at or above int(2 * ffn_mult * hidden_size / 3)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return -(-size // FFN_MULT_MULTIPLE) * FFN_MULT_MULTIPLE


class DeciLMConfig(LlamaConfig):
    """LLaMA configuration whose layers each follow their own block config."""

    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[dict[str, Any]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_configs = [block_section(dict(block)) for block in block_configs or []]

    def layer_kv_heads(self, index: int) -> int:
        """KV heads of layer ``index`` (0 where its attention is a no-op)."""
        attention = self.block_configs[index].attention
        if attention.get("no_op"):
            return 0
        return self.num_attention_heads // int(attention["n_heads_in_group"])

    def layer_intermediate_size(self, index: int) -> int:
        """MLP width of layer ``index`` (0 where its FFN is a no-op)."""
        ffn = self.block_configs[index].ffn
        if ffn.get("no_op"):
            return 0
        if ffn.get("ffn_mult") is not None:
            return ffn_mult_to_intermediate_size(float(ffn["ffn_mult"]), self.hidden_size)
        return int(ffn["intermediate_size"])


__all__ = ["DeciLMConfig"]
