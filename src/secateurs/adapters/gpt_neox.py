"""GPT-NeoX / Pythia: parallel residual (attention and MLP both read the block input)."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock

GPT_NEOX = register_adapter(
    Adapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        attn=SubBlock("attention", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
    )
)
