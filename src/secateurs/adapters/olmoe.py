"""OLMoE: OLMo attention (q/k norms over all heads) with a Mixtral-style sparse MoE MLP."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock

OLMOE = register_adapter(
    Adapter(
        name="olmoe",
        model_types=("olmoe",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        width_unsupported="q_norm/k_norm normalise over all heads together, and the MLP is a "
        "mixture of experts (prune whole experts with --unit experts)",
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="num_experts"),
    )
)

# FlexOlmo: OLMo 2's output norms (no pre-norms) around an OLMoE-style MoE MLP.
FLEX_OLMO = register_adapter(
    Adapter(
        name="flex_olmo",
        model_types=("flex_olmo",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("post_attention_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_feedforward_layernorm",)),
        width_unsupported=OLMOE.width_unsupported,
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="num_experts"),
    )
)
