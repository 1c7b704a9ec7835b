"""DeepSeek-V2: multi-head latent attention (MLA), dense first layers, then MoE MLPs with
shared experts.

``first_k_dense_replace`` makes layers below it dense: the kept dense layers stay a prefix after
block removal, so the count is rewritten to the kept ones. Experts are supported with the
``greedy`` router; ``group_limited_greedy`` groups experts by index (experts / n_group per
group), which removing experts would reshuffle, so it is refused.
"""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock


@dataclass(frozen=True)
class DeepseekV2Adapter(Adapter):
    def remap_layer_config(self, config: PretrainedConfig, kept: list[int]) -> None:
        super().remap_layer_config(config, kept)
        config.first_k_dense_replace = sum(i < config.first_k_dense_replace for i in kept)

    def experts_refusal(self, config: PretrainedConfig) -> str:
        if getattr(config, "topk_method", "greedy") != "greedy":
            return (
                f"topk_method={config.topk_method!r} selects experts within groups of "
                "consecutive indices; removing experts would change the groups"
            )
        return ""


DEEPSEEK_V2 = register_adapter(
    DeepseekV2Adapter(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        width_unsupported="multi-head latent attention shares low-rank q/kv projections across "
        "heads, and the MoE MLP's unit is a whole expert (--unit experts)",
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="n_routed_experts"),
    )
)
