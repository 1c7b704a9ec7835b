"""Phi-3: LLaMA layout with fused ``qkv_proj`` and ``gate_up_proj``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock

PHI3 = register_adapter(
    Adapter(
        name="phi3",
        model_types=("phi3",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        # The forward reads config.num_attention_heads to split qkv: per-layer widths need a
        # private config per attention module.
        heads=HeadLayout(
            "self_attn",
            o="self_attn.o_proj",
            qkv="self_attn.qkv_proj",
            fused="stacked",
            attrs=(("num_key_value_heads", "kv_heads"), ("config", "config")),
        ),
        channels=ChannelLayout("mlp.down_proj", gate_up="mlp.gate_up_proj"),
    )
)
