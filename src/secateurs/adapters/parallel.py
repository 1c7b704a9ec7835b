"""Parallel-residual families: x + attn(ln(x)) + mlp(ln(x)) with one shared norm.

Cohere, Phi (1/2) and GPT-J feed both branches from the same ``input_layernorm``/``ln_1``: the
norm serves the kept branch, so it never leaves with a removed one (a removed branch simply
adds nothing, which is exactly what masking its output computes).
"""

from dataclasses import dataclass, replace

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock
from secateurs.adapters.llama import HEADS

_LLAMA_MLP = ChannelLayout("mlp.down_proj", inputs=("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class ParallelAdapter(Adapter):
    def parallel_residual(self, config: PretrainedConfig) -> bool:
        return True


@dataclass(frozen=True)
class CohereAdapter(ParallelAdapter):
    def width_refusal(self, kind: str, config: PretrainedConfig | None) -> str:
        if kind == "heads" and getattr(config, "use_qk_norm", False):
            return "use_qk_norm holds one norm weight per head, not sliced by this adapter"
        return ""


COHERE = register_adapter(
    CohereAdapter(
        name="cohere",
        model_types=("cohere",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", returns_tuple=True),
        mlp=SubBlock("mlp"),
        heads=replace(HEADS, head_dim_key=None, bias_flag=None),
        channels=_LLAMA_MLP,
    )
)

PHI = register_adapter(
    ParallelAdapter(
        name="phi",
        model_types=("phi",),
        layers_path="model.layers",
        attn=SubBlock("self_attn", returns_tuple=True),
        mlp=SubBlock("mlp"),
        # q/k layernorms (if any) act on head_dim, shared by all heads: heads can go.
        heads=HeadLayout(
            "self_attn",
            o="self_attn.dense",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            head_dim_key=None,
        ),
        channels=ChannelLayout("mlp.fc2", inputs=("mlp.fc1",)),
    )
)

GPTJ = register_adapter(
    ParallelAdapter(
        name="gptj",
        model_types=("gptj",),
        layers_path="transformer.h",
        attn=SubBlock("attn", returns_tuple=True),
        mlp=SubBlock("mlp"),
        # Rotary acts on the first rotary_dim of each head, so whole heads can go; the forward
        # reshapes with ``num_attention_heads``.
        heads=HeadLayout(
            "attn",
            o="attn.out_proj",
            q="attn.q_proj",
            k="attn.k_proj",
            v="attn.v_proj",
            heads_key="n_head",
            kv_heads_key=None,
            head_dim_key=None,
            attrs=(("num_attention_heads", "heads"),),
        ),
        channels=ChannelLayout("mlp.fc_out", inputs=("mlp.fc_in",), size_key="n_inner"),
    )
)
