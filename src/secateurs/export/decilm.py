"""``--to decilm``: NVIDIA's DeciLM / ``nemotron-nas`` layout, one ``block_configs`` entry a layer.

vLLM (``nemotron_nas.py``), SGLang and TensorRT-LLM build each layer from its block config:
attention ``no_op`` or KV groups via ``n_heads_in_group`` (query heads are fixed per model), FFN
``no_op`` or a width, given as ``ffn_mult`` (width = the multiple of 256 at or above
int(2·ffn_mult·hidden/3)) or as ``intermediate_size`` where no ``ffn_mult`` gives it exactly.
llama.cpp's converter reads only ``ffn_mult`` and treats ``null`` as "no FFN": a width without an
exact ``ffn_mult`` therefore carries no ``ffn_mult`` key at all, so that converter fails loudly
instead of silently dropping the FFN.

The configuration and modeling code are ours (``decilm_code/``), copied into the output and
named in ``auto_map``, so ``trust_remote_code=True`` loads the export with transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.errors import UnsupportedModelError
from secateurs.export.layout import Layout, check_family

CODE_DIR = Path(__file__).parent / "decilm_code"
CODE_FILES = ("configuration_decilm.py", "modeling_decilm.py")
FFN_MULT_MULTIPLE = 256


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The width DeciLM engines derive from ``ffn_mult``: the multiple of 256 at or above
    int(2·ffn_mult·hidden/3)."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return -(-size // FFN_MULT_MULTIPLE) * FFN_MULT_MULTIPLE


def exact_ffn_mult(intermediate_size: int, hidden_size: int) -> float | None:
    """An ``ffn_mult`` that engines turn back into exactly ``intermediate_size``, if any."""
    if intermediate_size % FFN_MULT_MULTIPLE:
        return None
    mult = round(3 * intermediate_size / (2 * hidden_size), 6)
    return mult if ffn_mult_to_intermediate_size(mult, hidden_size) == intermediate_size else None


def check(layout: Layout) -> None:
    """Refuse, with the reason and the flags that fix it, what DeciLM cannot express."""
    check_family(layout, "decilm")
    heads = layout.query_heads()
    if len(heads) > 1:
        raise UnsupportedModelError(
            f"--to decilm: layers keep different numbers of query heads ({sorted(heads)}), but "
            "DeciLM fixes num_attention_heads per model and varies only KV groups. Prune heads "
            "alike in every layer (--target vllm, --allocation uniform without --layers, or "
            "--unit channels), or export --to gguf, whose deci architecture has per-layer heads."
        )
    q = heads.pop() if heads else layout.num_attention_heads
    for i, shape in enumerate(layout.layers):
        if shape.has_attention and q % shape.kv_heads:
            raise UnsupportedModelError(
                f"--to decilm: layer {i} has {q} query heads over {shape.kv_heads} KV heads; "
                "n_heads_in_group must be a whole number."
            )


ENGINES = ("vLLM", "SGLang", "TensorRT-LLM", "transformers (trust_remote_code)")
# SGLang and TensorRT-LLM build every MLP from ffn_mult and without biases (SGLang skips bias
# weights it has no parameter for: a bias would be silently dropped); vLLM reads
# intermediate_size where ffn_mult is absent, and attention_bias / mlp_bias.
BROAD = ("vLLM", "transformers (trust_remote_code)")


def engines(layout: Layout) -> tuple[str, ...]:
    """The engines that load this export: all, or only those reading widths and biases."""
    exact = all(
        exact_ffn_mult(s.channels, layout.hidden_size) is not None
        for s in layout.layers
        if s.has_mlp
    )
    return ENGINES if exact and not has_biases(layout) else BROAD


def has_biases(layout: Layout) -> bool:
    return bool(layout.config.get("attention_bias") or layout.config.get("mlp_bias"))


def block_config(shape, num_heads: int, hidden_size: int, biased: bool) -> dict[str, Any]:
    """One layer's block config, in NVIDIA's schema (plus ``intermediate_size``).

    ``ffn_mult`` is written only where it gives the width exactly and the model has no biases:
    engines that read only ``ffn_mult`` (SGLang, TensorRT-LLM) would drop a bias silently, and
    without the key they fail loudly instead.
    """
    if shape.has_attention:
        attention = {"no_op": False, "replace_with_linear": False}
        attention["n_heads_in_group"] = num_heads // shape.kv_heads
    else:
        attention = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    if not shape.has_mlp:
        ffn = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    else:
        ffn = {"no_op": False, "replace_with_linear": False}
        mult = None if biased else exact_ffn_mult(shape.channels, hidden_size)
        if mult is not None:
            ffn["ffn_mult"] = mult
        ffn["intermediate_size"] = shape.channels
    return {"attention": attention, "ffn": ffn}


def decilm_config(layout: Layout) -> dict[str, Any]:
    """config.json of the export: the source LLaMA config with DeciLM's per-layer blocks."""
    config = {k: v for k, v in layout.config.items() if not k.startswith("_")}
    heads = layout.query_heads()
    num_heads = heads.pop() if heads else layout.num_attention_heads
    attn = [s for s in layout.layers if s.has_attention]
    config.update(
        architectures=["DeciLMForCausalLM"],
        model_type="nemotron-nas",
        auto_map={
            "AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
        },
        num_attention_heads=num_heads,
        head_dim=layout.head_dim,
        # Global values for code that ignores block_configs: the largest layer (engines that
        # know nemotron-nas read every layer's own value from block_configs).
        num_key_value_heads=max((s.kv_heads for s in attn), default=1),
        intermediate_size=max((s.channels for s in layout.layers), default=0),
        block_configs=[
            block_config(s, num_heads, layout.hidden_size, has_biases(layout))
            for s in layout.layers
        ],
    )
    return config


def write(model: PreTrainedModel, tokenizer: Tokenizer | None, layout: Layout, out: Path) -> None:
    """Weights under LLaMA's names (removed branches simply absent), config, code, tokenizer."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout.config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(decilm_config(layout), indent=2) + "\n")
    for name in CODE_FILES:
        shutil.copyfile(CODE_DIR / name, out / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
