"""Gemma (LLaMA layout) and Gemma 2/3 (extra norms on each branch's output)."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock
from secateurs.adapters.llama import CHANNELS as _LLAMA_CHANNELS
from secateurs.adapters.llama import HEADS

# Gemma MLPs have no bias flag: ``mlp_bias`` is not read, so FLAP cannot compensate channels.
CHANNELS = _LLAMA_CHANNELS.__class__(_LLAMA_CHANNELS.output, _LLAMA_CHANNELS.inputs)

GEMMA = register_adapter(
    Adapter(
        name="gemma",
        model_types=("gemma",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        heads=HEADS,
        channels=CHANNELS,
    )
)

# Gemma 2/3 normalise each branch's output before the residual add. RMSNorm(0) = 0, so a zeroed
# branch stays zero through its post-norm, which therefore leaves with the branch.
GEMMA2 = register_adapter(
    Adapter(
        name="gemma2",
        output_norms=True,
        model_types=("gemma2", "gemma3_text"),
        layers_path="model.layers",
        attn=SubBlock(
            "self_attn",
            companions=("input_layernorm", "post_attention_layernorm"),
            returns_tuple=True,
        ),
        mlp=SubBlock("mlp", companions=("pre_feedforward_layernorm", "post_feedforward_layernorm")),
        heads=HEADS,
        channels=CHANNELS,
    )
)
