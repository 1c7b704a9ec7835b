"""GPT-OSS: per-head attention sinks, alternating sliding/full layers, a biased router."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock

GPT_OSS = register_adapter(
    Adapter(
        name="gpt_oss",
        model_types=("gpt_oss",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        # The MoE MLP returns (hidden, router_scores).
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",), returns_tuple=True),
        width_unsupported="each attention head has a learned sink logit (self_attn.sinks) not "
        "sliced by this adapter, and the MLP is a mixture of experts (--unit experts)",
        # router.bias (one per expert) is sliced with router.weight.
        experts=ExpertLayout("mlp.router", "mlp.experts", count_key="num_local_experts"),
    )
)
