"""Architecture adapters: one small file per family, registered in ``ARCHITECTURES``.

The table below declares each adapter (module, model types, unit kinds), so that ``secateurs
ls`` and the "is this architecture supported" check read it without importing torch; an
adapter's module is imported when a model of its type is first met, and its registration is
checked against the table.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from secateurs.errors import UnsupportedModelError
from secateurs.registry import Registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from secateurs.adapters.base import Adapter

ARCHITECTURES: Registry[Adapter] = Registry("architecture")

DEPTH = "block attn mlp"
# name, module, model types, unit kinds
TABLE = (
    ("bloom", "bloom", "bloom", f"{DEPTH} channels"),
    ("cohere", "parallel", "cohere", f"{DEPTH} heads channels"),
    ("deepseek_v2", "deepseek", "deepseek_v2", f"{DEPTH} experts"),
    ("deepseek_v3", "deepseek", "deepseek_v3", f"{DEPTH} experts"),
    ("exaone4", "exaone4", "exaone4", f"{DEPTH} heads channels"),
    ("falcon", "falcon", "falcon", f"{DEPTH} channels"),
    ("flex_olmo", "olmoe", "flex_olmo", f"{DEPTH} experts"),
    ("gemma", "gemma", "gemma", f"{DEPTH} heads channels"),
    ("gemma2", "gemma", "gemma2 gemma3_text", f"{DEPTH} heads channels"),
    ("glm4", "glm4", "glm4", f"{DEPTH} heads channels"),
    ("glm4_moe", "deepseek", "glm4_moe", f"{DEPTH} heads experts"),
    ("gpt2", "gpt2", "gpt2", f"{DEPTH} heads channels"),
    ("gpt_neox", "gpt_neox", "gpt_neox", f"{DEPTH} heads channels"),
    ("gpt_oss", "gpt_oss", "gpt_oss", f"{DEPTH} experts"),
    ("gptj", "parallel", "gptj", f"{DEPTH} heads channels"),
    ("granite", "granite", "granite smollm3", f"{DEPTH} heads channels"),
    ("llama", "llama", "llama mistral qwen2 qwen3", f"{DEPTH} heads channels"),
    ("llama4", "llama4", "llama4_text", f"{DEPTH} heads experts"),
    ("mixtral", "mixtral", "mixtral", f"{DEPTH} heads experts"),
    ("olmo2", "olmo2", "olmo2 olmo3", f"{DEPTH} channels"),
    ("olmoe", "olmoe", "olmoe", f"{DEPTH} experts"),
    ("opt", "opt", "opt", f"{DEPTH} heads channels"),
    ("phi", "parallel", "phi", f"{DEPTH} heads channels"),
    ("phi3", "phi3", "phi3", f"{DEPTH} heads channels"),
    ("qwen_moe", "qwen_moe", "qwen2_moe qwen3_moe", f"{DEPTH} heads experts"),
    ("stablelm", "stablelm", "stablelm", f"{DEPTH} heads channels"),
    ("starcoder2", "starcoder2", "starcoder2", f"{DEPTH} heads channels"),
)
for _name, _module, _types, _units in TABLE:
    ARCHITECTURES.declare(
        _name,
        f"secateurs.adapters.{_module}",
        model_types=tuple(_types.split()),
        unit_kinds=tuple(_units.split()),
    )


def register_adapter(adapter: Adapter) -> Adapter:
    ARCHITECTURES.add(adapter.name, adapter)
    return adapter


def supported_model_types() -> list[str]:
    """Every model type with an adapter (from the table and run-time registrations)."""
    types = {t for _, info in ARCHITECTURES.catalog() for t in info["model_types"]}
    return sorted(types | {t for _, a in ARCHITECTURES.loaded() for t in a.model_types})


def adapter_for(model_or_config: PreTrainedModel | PretrainedConfig) -> Adapter:
    """The adapter for a model or config, or a clear error naming what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    for _, adapter in ARCHITECTURES.loaded():
        if adapter.supports(model_type):
            return adapter
    for name, info in ARCHITECTURES.catalog():
        if model_type in info["model_types"]:
            return ARCHITECTURES.get(name)
    raise UnsupportedModelError(
        f"Architecture {model_type!r} is not supported. "
        f"Supported model types: {', '.join(supported_model_types())}."
    )


__all__ = [
    "ARCHITECTURES",
    "SUB_BLOCKS",
    "TABLE",
    "Adapter",
    "SubBlock",
    "adapter_for",
    "register_adapter",
    "supported_model_types",
]


def __getattr__(name: str) -> Any:
    """``Adapter``, ``SubBlock`` and ``SUB_BLOCKS`` from ``adapters.base`` (torch), on first use."""
    if name in ("Adapter", "SubBlock", "SUB_BLOCKS"):
        return getattr(import_module("secateurs.adapters.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
