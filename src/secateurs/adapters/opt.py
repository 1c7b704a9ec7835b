"""OPT: the MLP is not a module (``fc1``/``fc2`` sit on the layer); 350m is post-norm."""

from dataclasses import dataclass

from transformers import PretrainedConfig

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock


@dataclass(frozen=True)
class OPTAdapter(Adapter):
    def sub_block(self, part: str, config: PretrainedConfig) -> SubBlock:
        branch = super().sub_block(part, config)
        if getattr(config, "do_layer_norm_before", True):
            return branch
        # Post-norm OPT normalises the residual sum, so its norms belong to the layer, not a branch.
        companions = tuple(n for n in branch.companions if not n.endswith("layer_norm"))
        return SubBlock(branch.output, companions, branch.returns_tuple, branch.residual_arg)


OPT = register_adapter(
    OPTAdapter(
        name="opt",
        model_types=("opt",),
        layers_path="model.decoder.layers",
        attn=SubBlock("self_attn", companions=("self_attn_layer_norm",), returns_tuple=True),
        mlp=SubBlock("fc2", companions=("fc1", "final_layer_norm")),
        # head_dim = hidden / heads in OPT's config: pruned heads need secateurs to reload.
        heads=HeadLayout(
            "self_attn",
            o="self_attn.out_proj",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            kv_heads_key=None,
            head_dim_key=None,
            attrs=(("num_heads", "heads"),),
        ),
        channels=ChannelLayout("fc2", inputs=("fc1",), size_key="ffn_dim"),
    )
)
