"""Falcon: three layouts chosen by the config (sequential, parallel with one shared norm, or
the "new decoder architecture" with ``ln_attn``/``ln_mlp``)."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, SubBlock


@dataclass(frozen=True)
class FalconAdapter(Adapter):
    def sub_block(self, part: str, config: PretrainedConfig) -> SubBlock:
        branch = super().sub_block(part, config)
        norm = _branch_norm(part, config)
        companions = (norm,) if norm else ()
        return SubBlock(branch.output, companions, branch.returns_tuple, branch.residual_arg)

    def parallel_residual(self, config: PretrainedConfig) -> bool:
        return bool(config.parallel_attn)


def _branch_norm(part: str, config: PretrainedConfig) -> str:
    """The norm that serves only this branch ("" when both branches share one)."""
    if not config.parallel_attn:
        return "input_layernorm" if part == "attn" else "post_attention_layernorm"
    two_norms = config.new_decoder_architecture and config.num_ln_in_parallel_attn in (None, 2)
    if two_norms:
        return "ln_attn" if part == "attn" else "ln_mlp"
    return ""


FALCON = register_adapter(
    FalconAdapter(
        name="falcon",
        model_types=("falcon",),
        layers_path="transformer.h",
        attn=SubBlock("self_attention", returns_tuple=True),
        mlp=SubBlock("mlp"),
        channels=ChannelLayout(
            "mlp.dense_4h_to_h", inputs=("mlp.dense_h_to_4h",), size_key="ffn_hidden_size"
        ),
        width_unsupported="Falcon's fused query_key_value changes layout with multi_query / "
        "new_decoder_architecture (and multi-query has one KV head), so head groups are not "
        "sliced by this adapter",
    )
)
