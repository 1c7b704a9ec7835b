"""Architecture adapters: one small file per family, registered in ``ARCHITECTURES``."""

from __future__ import annotations

from transformers import PretrainedConfig, PreTrainedModel

from secateurs.adapters.base import SUB_BLOCKS, Adapter, SubBlock
from secateurs.errors import UnsupportedModelError
from secateurs.registry import Registry

ARCHITECTURES: Registry[Adapter] = Registry("architecture")


def register_adapter(adapter: Adapter) -> Adapter:
    ARCHITECTURES.add(adapter.name, adapter)
    return adapter


def supported_model_types() -> list[str]:
    return sorted(t for _, a in ARCHITECTURES.items() for t in a.model_types)


def adapter_for(model_or_config: PreTrainedModel | PretrainedConfig) -> Adapter:
    """The adapter for a model or config, or a clear error naming what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for _, adapter in ARCHITECTURES.items():
        if adapter.supports(model_type):
            return adapter
    raise UnsupportedModelError(
        f"Architecture {model_type!r} is not supported. "
        f"Supported model types: {', '.join(supported_model_types())}."
    )


# Explicit imports (no silent discovery): each module registers its adapter on import.
from secateurs.adapters import (  # noqa: E402,F401
    bloom,
    deepseek,
    exaone4,
    falcon,
    gemma,
    glm4,
    gpt2,
    gpt_neox,
    gpt_oss,
    granite,
    llama,
    llama4,
    mixtral,
    olmo2,
    olmoe,
    opt,
    parallel,
    phi3,
    qwen_moe,
    stablelm,
    starcoder2,
)

__all__ = ["ARCHITECTURES", "SUB_BLOCKS", "Adapter", "SubBlock", "adapter_for", "register_adapter"]
