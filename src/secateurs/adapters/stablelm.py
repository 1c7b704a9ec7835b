"""StableLM: LLaMA names with LayerNorms; ``use_parallel_residual`` shares one norm."""

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, SubBlock
from secateurs.adapters.llama import HEADS


@dataclass(frozen=True)
class StableLmAdapter(Adapter):
    def sub_block(self, part: str, config: PretrainedConfig) -> SubBlock:
        branch = super().sub_block(part, config)
        if not getattr(config, "use_parallel_residual", False):
            return branch
        # Parallel: both branches read input_layernorm; post_attention_layernorm is None.
        return SubBlock(branch.output, (), branch.returns_tuple, branch.residual_arg)

    def parallel_residual(self, config: PretrainedConfig) -> bool:
        return bool(getattr(config, "use_parallel_residual", False))

    def width_refusal(self, kind: str, config: PretrainedConfig | None) -> str:
        if kind == "heads" and getattr(config, "qk_layernorm", False):
            return "qk_layernorm keeps one LayerNorm per head in a list, not sliced by this adapter"
        return ""


STABLELM = register_adapter(
    StableLmAdapter(
        name="stablelm",
        model_types=("stablelm",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", companions=("input_layernorm",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("post_attention_layernorm",)),
        # head size = hidden / heads; the forward reshapes with num_heads / num_key_value_heads.
        heads=replace(
            HEADS,
            head_dim_key=None,
            bias_flag=None,
            attrs=(("num_heads", "heads"), ("num_key_value_heads", "kv_heads")),
        ),
        channels=ChannelLayout("mlp.down_proj", inputs=("mlp.gate_proj", "mlp.up_proj")),
    )
)
