"""GPT-NeoX / Pythia: parallel residual (attention and MLP both read the block input)."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock


@dataclass(frozen=True)
class GptNeoXAdapter(Adapter):
    def parallel_residual(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "use_parallel_residual", True))


GPT_NEOX = register_adapter(
    GptNeoXAdapter(
        name="gpt_neox",
        model_types=("gpt_neox",),
        layers_path="gpt_neox.layers",
        attn=SubBlock("attention", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        # qkv is [q k v] per head; rotary acts inside each head, so whole heads can go.
        # head_size = hidden / heads in the config: pruned heads need secateurs to reload.
        heads=HeadLayout(
            "attention",
            o="attention.dense",
            qkv="attention.query_key_value",
            fused="interleaved",
            head_dim_attr="head_size",
            kv_heads_key=None,
            head_dim_key=None,
        ),
        channels=ChannelLayout("mlp.dense_4h_to_h", inputs=("mlp.dense_h_to_4h",)),
    )
)
