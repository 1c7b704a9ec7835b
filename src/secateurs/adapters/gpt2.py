"""GPT-2: ``transformer.h`` blocks with ``ln_1``/``attn`` and ``ln_2``/``mlp``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, ChannelLayout, HeadLayout, SubBlock

GPT2 = register_adapter(
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        attn=SubBlock("attn", companions=("ln_1",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("ln_2",)),
        # Conv1D weights are (in, out). head_dim = n_embd / n_head: pruned heads need secateurs.
        heads=HeadLayout(
            "attn",
            o="attn.c_proj",
            qkv="attn.c_attn",
            fused="stacked",
            conv1d=True,
            heads_key="n_head",
            kv_heads_key=None,
            head_dim_key=None,
            attrs=(("num_heads", "heads"), ("split_size", "q_width")),
        ),
        channels=ChannelLayout("mlp.c_proj", inputs=("mlp.c_fc",), conv1d=True, size_key="n_inner"),
    )
)
