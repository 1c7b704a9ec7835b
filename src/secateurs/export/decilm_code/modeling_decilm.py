"""DeciLM / ``nemotron-nas`` model for transformers, written by secateurs for its exports.

Each decoder layer is a LLaMA layer built from its own block config: attention with that
layer's KV heads, or none (``no_op``); an MLP of that layer's width, or none. Weights keep
LLaMA's names, so the checkpoint is the pruned model's own state dict.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaRMSNorm,
)

from .configuration_decilm import DeciLMConfig


def layer_config(config: DeciLMConfig, index: int) -> DeciLMConfig:
    """A copy of ``config`` carrying layer ``index``'s KV heads and MLP width."""
    own = copy.copy(config)
    own.num_key_value_heads = config.layer_kv_heads(index) or config.num_key_value_heads
    own.intermediate_size = config.layer_intermediate_size(index) or config.intermediate_size
    return own


class DeciLMDecoderLayer(nn.Module):
    """A LLaMA decoder layer whose attention and MLP may each be absent."""

    def __init__(self, config: DeciLMConfig, layer_idx: int) -> None:
        super().__init__()
        own = layer_config(config, layer_idx)
        self.layer_idx = layer_idx
        self.self_attn = self.input_layernorm = None
        self.mlp = self.post_attention_layernorm = None
        if config.layer_kv_heads(layer_idx):
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = LlamaAttention(config=own, layer_idx=layer_idx)
        if config.layer_intermediate_size(layer_idx):
            self.post_attention_layernorm = LlamaRMSNorm(
                config.hidden_size, eps=config.rms_norm_eps
            )
            self.mlp = LlamaMLP(own)

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            attended, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                past_key_values=past_key_values,
                **kwargs,
            )
            hidden_states = hidden_states + attended
        elif past_key_values is not None:
            self._advance_cache(hidden_states, past_key_values)
        if self.mlp is not None:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states

    def _advance_cache(self, hidden_states: torch.Tensor, cache) -> None:
        """Keep this layer's cache slot as long as the sequence (with zero heads: no memory),
        because the cache's sequence length is read from its layers."""
        batch, length = hidden_states.shape[:2]
        empty = hidden_states.new_zeros(batch, 0, length, 1)
        cache.update(empty, empty, self.layer_idx)


class DeciLMModel(LlamaModel):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            [DeciLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()


class DeciLMForCausalLM(LlamaForCausalLM):
    config_class = DeciLMConfig

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        self.model = DeciLMModel(config)
        self.post_init()


__all__ = ["DeciLMForCausalLM", "DeciLMModel"]
