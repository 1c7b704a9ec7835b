"""Phi-3: LLaMA layout with fused ``qkv_proj`` and ``gate_up_proj``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock

PHI3 = register_adapter(
    Adapter(
        name="phi3",
        model_types=("phi3",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
    )
)
