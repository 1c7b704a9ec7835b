"""BLOOM: attention and MLP add their residual themselves (``residual`` is their 2nd argument)."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, SubBlock

BLOOM = register_adapter(
    Adapter(
        name="bloom",
        model_types=("bloom",),
        layers_path="transformer.h",
        attn=SubBlock(
            "self_attention", companions=("input_layernorm",), returns_tuple=True, residual_arg=1
        ),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",), residual_arg=1),
        # The MLP is 4·hidden by construction (no config key): pruned channels need secateurs.
        channels=ChannelLayout("mlp.dense_4h_to_h", inputs=("mlp.dense_h_to_4h",), size_key=None),
        width_unsupported="BLOOM's ALiBi slopes depend on each head's index among n_head, so "
        "removing heads would change the kept heads' biases",
    )
)
