"""EXAONE 4: OLMo-2-style output norms, per-head q/k norms, sliding/full ``layer_types``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock
from secateurs.adapters.llama import HEADS
from secateurs.adapters.olmo2 import CHANNELS

# Each attention fixes sliding vs full (and whether it uses RoPE) from ``layer_types`` at
# construction; the list is sliced with the blocks, so a reload rebuilds the same layers.
EXAONE4 = register_adapter(
    Adapter(
        name="exaone4",
        output_norms=True,
        model_types=("exaone4",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("post_attention_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_feedforward_layernorm",)),
        heads=HEADS,
        channels=CHANNELS,
    )
)
