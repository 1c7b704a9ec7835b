"""LLaMA and its close relatives that share module names: Mistral, Qwen2, Qwen3."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock

# Qwen2 always has q/k/v biases; ``attention_bias`` adds q/k/v/o biases (LLaMA, Qwen3) and
# ``mlp_bias`` gate/up/down biases (LLaMA only): FLAP compensation needs the o / down bias.
HEADS = HeadLayout(
    "self_attn",
    o="self_attn.o_proj",
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    bias_flag="attention_bias",
)
CHANNELS = ChannelLayout(
    "mlp.down_proj", inputs=("mlp.gate_proj", "mlp.up_proj"), bias_flag="mlp_bias"
)

LLAMA = register_adapter(
    Adapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        heads=HEADS,
        channels=CHANNELS,
    )
)
