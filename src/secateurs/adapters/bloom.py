"""BLOOM: attention and MLP add their residual themselves (``residual`` is their 2nd argument)."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock

BLOOM = register_adapter(
    Adapter(
        name="bloom",
        model_types=("bloom",),
        layers_path="transformer.h",
        attn=SubBlock(
            "self_attention", companions=("input_layernorm",), returns_tuple=True, residual_arg=1
        ),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",), residual_arg=1),
    )
)
