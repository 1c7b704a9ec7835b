"""Granite, SmolLM3: LLaMA module names (Granite scales each branch by residual_multiplier).

Neither config has a ``head_dim`` key (head size = hidden / heads), so pruned heads need
secateurs to reload. SmolLM3's ``no_rope_layers`` and ``layer_types`` are sliced with the blocks.
"""

from dataclasses import replace

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock
from secateurs.adapters.llama import CHANNELS, HEADS

GRANITE = register_adapter(
    Adapter(
        name="granite",
        model_types=("granite", "smollm3"),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        heads=replace(HEADS, head_dim_key=None),
        channels=CHANNELS,
    )
)
