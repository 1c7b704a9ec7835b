"""DeepSeek-V2/V3 and GLM-4-MoE: dense first layers, then MoE MLPs with shared experts.

``first_k_dense_replace`` makes layers below it dense: the kept dense layers stay a prefix after
block removal, so the count is rewritten to the kept ones. Group-limited routing (V2's
``group_limited_greedy``, V3 / GLM with ``n_group > 1``) picks experts within groups of
consecutive indices, which removing experts would reshuffle: refused. V3 and GLM-4-MoE choose
experts by sigmoid score plus ``e_score_correction_bias``; the bias is sliced with the experts
and masked with them.
"""

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock
from secateurs.adapters.llama import HEADS


@dataclass(frozen=True)
class DeepseekV2Adapter(Adapter):
    def remap_layer_config(self, config: PretrainedConfig, kept: list[int]) -> None:
        super().remap_layer_config(config, kept)
        config.first_k_dense_replace = sum(i < config.first_k_dense_replace for i in kept)

    def experts_refusal(self, config: PretrainedConfig) -> str:
        groups = getattr(config, "n_group", None) or 1
        if getattr(config, "topk_method", "greedy") != "greedy" or groups > 1:
            return (
                f"the router selects experts within {groups} groups of consecutive indices "
                f"(topk_method={getattr(config, 'topk_method', None)!r}, n_group={groups}); "
                "removing experts would change the groups"
            )
        return ""


MLA = (
    "multi-head latent attention shares low-rank q/kv projections across heads, and the MoE "
    "MLP's unit is a whole expert (--unit experts)"
)


DEEPSEEK_V2 = register_adapter(
    DeepseekV2Adapter(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        width_unsupported=MLA,
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="n_routed_experts"),
    )
)

_BIASED = ExpertLayout(
    "mlp.gate", "mlp.experts", count_key="n_routed_experts", choice_bias="e_score_correction_bias"
)

DEEPSEEK_V3 = register_adapter(
    replace(DEEPSEEK_V2, name="deepseek_v3", model_types=("deepseek_v3",), experts=_BIASED)
)

# GLM-4.5/4.6 MoE: GQA attention (head size = hidden / heads unless head_dim is set).
GLM4_MOE = register_adapter(
    replace(
        DEEPSEEK_V2,
        name="glm4_moe",
        model_types=("glm4_moe",),
        heads=replace(HEADS, head_dim_key=None),
        width_unsupported="the MLP is a mixture of experts: prune whole experts (--unit experts)",
        experts=_BIASED,
    )
)
