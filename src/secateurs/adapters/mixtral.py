"""Mixtral: LLaMA attention, a sparse MoE MLP (``mlp.gate`` router, stacked ``mlp.experts``)."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock
from secateurs.adapters.llama import HEADS

# The MLP is a mixture of experts: its unit is a whole expert (--unit experts), not a channel.
MOE_CHANNELS = "the MLP is a mixture of experts: prune whole experts with --unit experts"

MIXTRAL = register_adapter(
    Adapter(
        name="mixtral",
        model_types=("mixtral",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        heads=HEADS,
        width_unsupported=MOE_CHANNELS,
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="num_local_experts"),
    )
)
