"""``--to gguf``: one GGUF file llama.cpp runs, written with the ``gguf`` package.

Uniform models use llama.cpp's ``llama`` architecture; per-layer widths or removed branches use
its ``deci`` architecture, whose metadata carries per-layer ``head_count``, ``head_count_kv``
and ``feed_forward_length`` arrays (0 heads: no attention in that layer). Two llama.cpp limits
shape the file:

- it reads the head size from layer 0, so layer 0 must keep its attention;
- its deci graph skips the whole rest of a layer whose FFN length is 0, attention output
  included, so a layer that keeps attention but lost its MLP gets a zero FFN of width 1 (all
  weights 0: it adds exactly nothing).

Q and K rows are permuted from Hugging Face's rotate-half order to the pairwise order of
llama.cpp's LLaMA rope, per layer with that layer's head counts.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.export.layout import Layout, check_family

log = logging.getLogger(__name__)

DTYPES = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}
# llama.cpp names its pre-tokenizers (text-splitting rules); we recognise the ones whose rules
# equal a tokenizer.json pre_tokenizer: GPT-2's byte-level regex, alone or after splitting every
# digit (SmolLM). Unknown ones fall back to "default".
BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True, "add_prefix_space": False}
DIGITS = {"type": "Digits", "individual_digits": True}
ZERO_FFN = 1  # width of the stand-in FFN for a layer whose MLP was removed


def check(layout: Layout) -> None:
    check_family(layout, "gguf")
    if layout.config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"--to gguf: llama.cpp's LLaMA graphs use SiLU; this model uses "
            f"{layout.config.get('hidden_act')!r}."
        )
    if not layout.layers[0].has_attention:
        raise UnsupportedModelError(
            "--to gguf: layer 0 has no attention, but llama.cpp reads the head size from layer "
            "0's head count. Protect layer 0 when removing attention (e.g. --protect sl)."
        )


def architecture(layout: Layout) -> gguf.MODEL_ARCH:
    return gguf.MODEL_ARCH.LLAMA if layout.uniform else gguf.MODEL_ARCH.DECI


def write(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    layout: Layout,
    out: Path,
    dtype: str = "f16",
) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"GGUF dtype {dtype!r} is not one of {sorted(DTYPES)}.")
    if tokenizer is None:
        raise ConfigError(
            "--to gguf needs the tokenizer beside the checkpoint (llama.cpp embeds it)."
        )
    arch = architecture(layout)
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, layout, DTYPES[dtype][1])
    write_vocab(writer, tokenizer, layout)
    for name, array in gguf_tensors(model, layout, arch, DTYPES[dtype][0]):
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def per_layer(values: list[int]) -> int | list[int]:
    """A scalar where every layer agrees (what plain llama files carry), else the array."""
    return values[0] if len(set(values)) == 1 else values


def ffn_lengths(layout: Layout) -> list[int]:
    return [
        s.channels if s.has_mlp else (ZERO_FFN if s.has_attention else 0) for s in layout.layers
    ]


def write_hparams(writer: gguf.GGUFWriter, layout: Layout, file_type: int) -> None:
    c = layout.config
    rope = rope_settings(c)
    writer.add_name(str(c.get("_name_or_path") or c.get("_model_name_or_path") or "pruned"))
    writer.add_block_count(len(layout.layers))
    writer.add_context_length(int(c["max_position_embeddings"]))
    writer.add_embedding_length(layout.hidden_size)
    writer.add_feed_forward_length(per_layer(ffn_lengths(layout)))
    writer.add_head_count(per_layer([s.heads for s in layout.layers]))
    writer.add_head_count_kv(per_layer([s.kv_heads for s in layout.layers]))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
    writer.add_vocab_size(int(c["vocab_size"]))
    writer.add_file_type(int(file_type))


# --- tokenizer ---------------------------------------------------------------------------------
def write_vocab(writer: gguf.GGUFWriter, tokenizer: Tokenizer, layout: Layout) -> None:
    """GPT-2-style BPE vocabulary, merges and special tokens, as llama.cpp's converter writes."""
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError("--to gguf supports BPE tokenizers with a tokenizer.json.")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend.get("model", {}).get("type") != "BPE":
        raise UnsupportedModelError(
            f"--to gguf: tokenizer model {backend.get('model', {}).get('type')!r} is not BPE."
        )
    tokens, types = token_list(tokenizer, int(layout.config["vocab_size"]))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([_merge_text(m) for m in backend["model"].get("merges", [])])
    special_ids(writer, tokenizer, layout.config)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


def token_list(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens by id (padding ids the tokenizer lacks) and their llama.cpp token types."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _merge_text(merge) -> str:
    return merge if isinstance(merge, str) else " ".join(merge)


def _is(step: dict | None, pattern: dict) -> bool:
    return step is not None and all(step.get(k) == v for k, v in pattern.items())


def pre_tokenizer_name(backend: dict) -> str:
    """llama.cpp's name for the tokenizer's text-splitting rules."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    name = None
    if len(steps) == 1 and _is(steps[0], BYTE_LEVEL):
        name = "gpt-2"
    elif len(steps) == 2 and _is(steps[0], DIGITS) and _is(steps[1], BYTE_LEVEL):
        name = "smollm"
    if name is None:
        log.warning(
            "pre-tokenizer not recognised: llama.cpp will split text with its default rules "
            "(token-id inputs are unaffected)"
        )
    return name or "default"


def special_ids(writer: gguf.GGUFWriter, tokenizer: Tokenizer, config: dict) -> None:
    for kind, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
    ):
        value = getattr(tokenizer, f"{kind}_token_id", None)
        if value is None:
            value = config.get(f"{kind}_token_id")
        if isinstance(value, int):
            add(value)


# --- tensors -----------------------------------------------------------------------------------
def rope_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from rotate-half order (x[:d/2], x[d/2:]) to pairwise (x0, x1, ...)."""
    shape = weight.shape
    return (
        weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def gguf_tensors(
    model: PreTrainedModel, layout: Layout, arch, float_type
) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, array) for every weight, Q/K permuted, stand-in FFNs added."""
    names = gguf.get_tensor_name_map(arch, len(layout.layers))
    out = []
    tied = bool(layout.config.get("tie_word_embeddings"))
    for key, tensor in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UnsupportedModelError(f"--to gguf: no GGUF name for weight {key!r}.")
        out.append((name, _array(_permuted(key, tensor.detach().float(), layout), float_type)))
    out += zero_ffns(layout, names)
    factors = llama3_rope_factors(layout)
    if factors is not None:
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors))
    return out


def rope_settings(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def llama3_rope_factors(layout: Layout) -> np.ndarray | None:
    """Llama-3 rope scaling as llama.cpp's per-frequency divisors (``rope_freqs``), or None.

    transformers scales inverse frequency f by 1/factor for long wavelengths, keeps short ones,
    and blends in between; llama.cpp divides each frequency by the stored factor.
    """
    rope = rope_settings(layout.config)
    if rope.get("rope_type") != "llama3":
        return None
    d = layout.head_dim
    freqs = 1.0 / float(rope["rope_theta"]) ** (np.arange(0, d, 2, dtype=np.float64) / d)
    wavelen = 2 * math.pi / freqs
    old = float(rope["original_max_position_embeddings"])
    factor, low, high = (float(rope[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
    smooth = (old / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < old / high, 1.0, np.where(wavelen > old / low, factor, blended))
    return factors.astype(np.float32)


def _permuted(key: str, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    parts = key.split(".")
    if "layers" not in parts or not key.endswith(
        ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")
    ):
        return tensor
    shape = layout.layers[int(parts[parts.index("layers") + 1])]
    return rope_permute(tensor, shape.heads if ".q_proj." in key else shape.kv_heads)


def _array(tensor: torch.Tensor, float_type) -> np.ndarray:
    # 1-D tensors (norms, biases) stay f32, as llama.cpp expects.
    return tensor.numpy().astype(np.float32 if tensor.ndim == 1 else float_type)


def zero_ffns(layout: Layout, names) -> list[tuple[str, np.ndarray]]:
    h, out = layout.hidden_size, []
    for i, s in enumerate(layout.layers):
        if s.has_mlp or not s.has_attention:
            continue
        for hf, shape in (
            ("post_attention_layernorm", (h,)),
            ("mlp.gate_proj", (ZERO_FFN, h)),
            ("mlp.up_proj", (ZERO_FFN, h)),
            ("mlp.down_proj", (h, ZERO_FFN)),
        ):
            name = names.get_name(f"model.layers.{i}.{hf}.weight", try_suffixes=(".weight",))
            out.append((name, np.zeros(shape, dtype=np.float32)))
    return out
