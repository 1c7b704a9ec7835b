"""GLM-4: pre- and post-norms around both branches, fused ``gate_up_proj``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, SubBlock
from secateurs.adapters.llama import HEADS

GLM4 = register_adapter(
    Adapter(
        name="glm4",
        output_norms=True,
        model_types=("glm4",),
        layers_path="model.layers",
        attn=SubBlock(
            "self_attn",
            companions=("input_layernorm", "post_self_attn_layernorm"),
            returns_tuple=True,
        ),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm", "post_mlp_layernorm")),
        heads=HEADS,
        channels=ChannelLayout("mlp.down_proj", gate_up="mlp.gate_up_proj"),
    )
)
