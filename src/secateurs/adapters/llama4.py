"""Llama 4 (text): MoE feed-forward with a shared expert, NoPE and chunked-attention layers.

Per-layer constants follow the layer index: ``no_rope_layers`` and ``layer_types`` are sliced
with the blocks and ``moe_layers`` (indices) is remapped, so a reload rebuilds each kept layer
as it was. The MoE feed-forward returns ``(out, router_logits)`` but a dense one returns a
tensor: removing the MLP branch is supported when every layer is MoE (Scout) or none is.
"""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ExpertLayout, SubBlock
from secateurs.adapters.llama import HEADS
from secateurs.errors import UnsupportedModelError


@dataclass(frozen=True)
class Llama4Adapter(Adapter):
    def sub_block(self, part: str, config: PretrainedConfig) -> SubBlock:
        branch = super().sub_block(part, config)
        if part != "mlp":
            return branch
        moe = set(getattr(config, "moe_layers", None) or ())
        if moe and len(moe) < config.num_hidden_layers:
            raise UnsupportedModelError(
                "Llama 4 with interleaved dense and MoE feed-forward layers: their outputs have "
                "different types, so removing the MLP branch is not supported; remove blocks "
                "or experts instead."
            )
        return SubBlock(branch.output, branch.companions, returns_tuple=bool(moe))


LLAMA4 = register_adapter(
    Llama4Adapter(
        name="llama4",
        model_types=("llama4_text",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("feed_forward", companions=("post_attention_layernorm",)),
        layer_index_config_keys=("moe_layers",),
        heads=HEADS,
        width_unsupported="the feed-forward is a mixture of experts with a shared expert: "
        "prune whole experts with --unit experts",
        # The experts run on router-scaled copies of every token, not (hidden, top-k ids,
        # weights): routing-based criteria cannot observe them; magnitude can score them.
        experts=ExpertLayout(
            "feed_forward.router",
            "feed_forward.experts",
            count_key="num_local_experts",
            observable=False,
        ),
    )
)
