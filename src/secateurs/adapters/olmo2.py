"""OLMo 2 / OLMo 3: norms on each branch's *output* (no pre-norms), q/k norms over all heads."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock
from secateurs.adapters.llama import CHANNELS as _LLAMA_CHANNELS

# No mlp_bias flag is read: FLAP compensation of channels is refused.
CHANNELS = _LLAMA_CHANNELS.__class__(_LLAMA_CHANNELS.output, _LLAMA_CHANNELS.inputs)

# RMSNorm(0) = 0, so a zeroed branch stays zero through its post-norm, which leaves with it.
# OLMo 3's sliding/full ``layer_types`` are sliced with the blocks (the default keys).
OLMO2 = register_adapter(
    Adapter(
        name="olmo2",
        output_norms=True,
        model_types=("olmo2", "olmo3"),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("post_attention_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_feedforward_layernorm",)),
        channels=CHANNELS,
        width_unsupported="q_norm/k_norm normalise over all heads together, so removing heads "
        "would change the kept heads' normalisation",
    )
)
