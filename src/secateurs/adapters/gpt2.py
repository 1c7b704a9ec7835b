"""GPT-2: ``transformer.h`` blocks with ``ln_1``/``attn`` and ``ln_2``/``mlp``."""

from secateurs.adapters import register_adapter
from secateurs.adapters.base import Adapter, SubBlock

GPT2 = register_adapter(
    Adapter(
        name="gpt2",
        model_types=("gpt2",),
        layers_path="transformer.h",
        attn=SubBlock("attn", companions=("ln_1",), returns_tuple=True),
        mlp=SubBlock("mlp", companions=("ln_2",)),
    )
)
