"""Qwen2-MoE (with a gated shared expert) and Qwen3-MoE: LLaMA attention, sparse MoE MLPs.

Which layers are MoE depends on the layer index (``decoder_sparse_step``, ``mlp_only_layers``);
after block removal the pattern is rewritten as an explicit ``mlp_only_layers`` list (with
``decoder_sparse_step=1``), so a reload rebuilds every kept layer as it was.
"""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock
from secateurs.adapters.llama import HEADS
from secateurs.adapters.mixtral import MOE_CHANNELS


def dense_layers(config: PretrainedConfig) -> list[int]:
    """Layers built with a dense MLP, as the Qwen MoE decoder layer decides."""
    step, only = config.decoder_sparse_step, set(config.mlp_only_layers or ())
    return [
        i
        for i in range(config.num_hidden_layers)
        if i in only or not (config.num_experts > 0 and (i + 1) % step == 0)
    ]


@dataclass(frozen=True)
class QwenMoeAdapter(Adapter):
    def remap_layer_config(self, config: PretrainedConfig, kept: list[int]) -> None:
        super().remap_layer_config(config, kept)
        dense = set(dense_layers(config))
        config.mlp_only_layers = [new for new, old in enumerate(kept) if old in dense]
        config.decoder_sparse_step = 1


QWEN_MOE = register_adapter(
    QwenMoeAdapter(
        name="qwen_moe",
        model_types=("qwen2_moe", "qwen3_moe"),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        heads=HEADS,
        width_unsupported=MOE_CHANNELS,
        experts=ExpertLayout("mlp.gate", "mlp.experts", count_key="num_experts"),
    )
)
