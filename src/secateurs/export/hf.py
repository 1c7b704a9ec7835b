"""``--to hf``: a plain Hugging Face checkpoint, where a plain config describes the model.

That is every depth-pruned model whose branches are all kept and every model with one width for
all layers: ``AutoModelForCausalLM.from_pretrained`` and every engine load it with no extra code.
Per-layer widths and removed branches are refused (use ``--to decilm`` or ``--to gguf``).

transformers (5.x) parses a ``per_layer_config`` on the config side, but no model class builds
layers from it yet, so we do not put one in config.json (a LLaMA model would fail to build, or,
for removed branches only, silently re-create them with random weights). The per-layer
description in that schema is recorded in ``secateurs.json`` instead, for the day a loader uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.errors import UnsupportedModelError
from secateurs.export.layout import Layout


def per_layer_config(layout: Layout) -> dict[str, dict[str, Any]]:
    """transformers' ``per_layer_config`` schema: only what differs from the global config."""
    if layout.plain or not layout.layers:
        return {}
    c = layout.config
    base = {
        "num_attention_heads": c["num_attention_heads"],
        "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
        "intermediate_size": c.get("intermediate_size"),
    }
    overrides: dict[str, dict[str, Any]] = {}
    for i, s in enumerate(layout.layers):
        own: dict[str, Any] = {}
        skip = [
            name for name, kept in (("attention", s.has_attention), ("mlp", s.has_mlp)) if not kept
        ]
        if skip:
            own["skip"] = skip
        for key, value in (
            ("num_attention_heads", s.heads),
            ("num_key_value_heads", s.kv_heads),
            ("intermediate_size", s.channels),
        ):
            if value and value != base[key]:
                own[key] = value
        if own:
            overrides[str(i)] = own
    return overrides


def check(layout: Layout) -> None:
    if not layout.plain:
        raise UnsupportedModelError(
            "--to hf: this model has per-layer widths or removed branches, which a plain "
            "Hugging Face config cannot express (transformers reads per_layer_config on the "
            "config side only). Export --to decilm (vLLM; transformers with "
            "trust_remote_code) or --to gguf (llama.cpp), or prune for it: --target hf (one "
            "width for all layers; no branch removal)."
        )


def write(model: PreTrainedModel, tokenizer: Tokenizer | None, layout: Layout, out: Path) -> None:
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
