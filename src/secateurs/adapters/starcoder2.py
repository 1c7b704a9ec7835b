"""StarCoder2: LLaMA attention names with biases, a ``c_fc``/``c_proj`` MLP, LayerNorms."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock

STARCODER2 = register_adapter(
    Adapter(
        name="starcoder2",
        model_types=("starcoder2",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        # head size = hidden / heads (no head_dim key): pruned heads need secateurs to reload.
        heads=HeadLayout(
            "self_attn",
            o="self_attn.o_proj",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            head_dim_key=None,
        ),
        channels=ChannelLayout("mlp.c_proj", inputs=("mlp.c_fc",)),
    )
)
