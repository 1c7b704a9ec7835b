"""LLaMA and its close relatives that share module names: Mistral, Qwen2, Qwen3."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock

LLAMA = register_adapter(
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
    )
)
