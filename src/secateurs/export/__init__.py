"""Engine exports of (pruned) checkpoints: one small file per format, registered in ``EXPORTS``.

    from secateurs.export import export
    export("pruned/", to="gguf", out="pruned.gguf")

Each format says, from the checkpoint's config and ``secateurs.json`` alone, whether it can
express the model (and if not, why and which pruning flags would make it expressible) before
any weight is loaded; then it writes atomically.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secateurs.checkpoint import write_json
from secateurs.errors import ConfigError, ModelNotFoundError, OutputExistsError, SecateursError
from secateurs.export.layout import Layout, check_model, read_layout
from secateurs.outputs import atomic_directory, check_output_dir
from secateurs.registry import Registry

log = logging.getLogger(__name__)

EXPORT_RECORD = "export.json"


@dataclass(frozen=True)
class ExportFormat:
    """How to check and write one output kind, and which engines load it.

    The work lives in ``secateurs.export.<module>`` (``check(layout)``, ``write(...)`` and,
    where some engines accept less than others, ``engines(layout)``), imported only when
    used: listing the formats (``--help``, ``ls``) must not import torch or gguf.
    """

    name: str
    summary: str
    engines: tuple[str, ...]
    module: str
    single_file: bool = False
    needs_tokenizer: bool = False

    def _implementation(self) -> Any:
        return importlib.import_module(f"secateurs.export.{self.module}")

    def check(self, layout: Layout) -> None:
        self._implementation().check(layout)

    def write(self, *args: Any, **kwargs: Any) -> None:
        self._implementation().write(*args, **kwargs)

    def engines_for(self, layout: Layout) -> tuple[str, ...]:
        """The engines that load this particular model."""
        narrow = getattr(self._implementation(), "engines", None)
        return narrow(layout) if narrow is not None else self.engines


EXPORTS: Registry[ExportFormat] = Registry("export format")
for _fmt in (
    ExportFormat(
        "hf",
        "plain Hugging Face checkpoint (uniform widths, no removed branches)",
        (
            "transformers",
            "vLLM",
            "SGLang",
            "TensorRT-LLM",
            "llama.cpp (its converter)",
            "lm-eval --model hf",
        ),
        "hf",
    ),
    ExportFormat(
        "decilm",
        "DeciLM / nemotron-nas block_configs (per-layer KV groups, MLP widths, no_op branches; "
        "SGLang and TensorRT-LLM only with widths on multiples of 256 and no biases)",
        ("vLLM", "SGLang", "TensorRT-LLM", "transformers (trust_remote_code)"),
        "decilm",
    ),
    ExportFormat(
        "gguf",
        "GGUF file (llama arch if uniform, deci arch with per-layer arrays otherwise)",
        ("llama.cpp", "llama-cpp-python", "engines built on llama.cpp (e.g. Ollama, LM Studio)"),
        "gguf_file",
        single_file=True,
        needs_tokenizer=True,
    ),
):
    EXPORTS.add(_fmt.name, _fmt)


def check_export(directory: str | os.PathLike, to: str) -> tuple[ExportFormat, Layout]:
    """The format and the checkpoint's layout, or a clear error, without loading weights."""
    from secateurs.models import resolve_model

    fmt = EXPORTS.get(to)
    location = Path(resolve_model(directory))
    if not location.is_dir():  # a hub id: its layout is read from local files
        raise ModelNotFoundError(
            f"No directory {directory}: export converts a local checkpoint (a directory from "
            "'secateurs prune', a .gguf file or an alias). For a hub model, download it first: "
            f"hf download {directory} --local-dir DIR."
        )
    layout = read_layout(location)
    fmt.check(layout)
    if fmt.needs_tokenizer and not any(location.glob("tokenizer*")):
        raise ConfigError(f"--to {to} embeds the tokenizer, but {location} has none beside it.")
    return fmt, layout


def export(
    directory: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    dtype: str = "f16",
) -> Path:
    """Write ``directory`` (a checkpoint, hub id or alias) as ``to`` into ``out``."""
    from secateurs.models import load_model

    fmt, layout = check_export(directory, to)
    _check_out(Path(out), fmt, overwrite)
    model, tokenizer = load_model(directory)
    check_model(model, layout)
    extra = {"dtype": dtype} if fmt.single_file else {}
    if fmt.single_file:
        _write_file(Path(out), lambda tmp: fmt.write(model, tokenizer, layout, tmp, **extra))
    else:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            fmt.write(model, tokenizer, layout, tmp)
            write_json(tmp / EXPORT_RECORD, export_record(fmt, directory, layout))
    engines = ", ".join(fmt.engines_for(layout))
    log.info("exported %s as %s to %s (loads in: %s)", directory, to, out, engines)
    return Path(out)


def _per_layer_config(layout: Layout) -> dict[str, Any]:
    from secateurs.export.hf import per_layer_config

    return per_layer_config(layout)


def export_record(fmt: ExportFormat, source: Any, layout: Layout) -> dict[str, Any]:
    return {
        "format": fmt.name,
        "source": str(source),
        "engines": list(fmt.engines_for(layout)),
        "layers": [vars(s) for s in layout.layers],
        "per_layer_config": _per_layer_config(layout),
    }


def _check_out(out: Path, fmt: ExportFormat, overwrite: bool) -> None:
    if not fmt.single_file:
        check_output_dir(out, overwrite)
    elif out.exists() and (out.is_dir() or not overwrite):
        raise OutputExistsError(
            f"{out} exists; pass --overwrite (from Python: overwrite=True) to replace it "
            "(files only)."
        )


def _write_file(out: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary sibling, renamed into place only on success."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def engines_for(layout: Layout) -> dict[str, Any]:
    """Per output kind: the engines that load it, or why that kind cannot express the model."""
    kinds: dict[str, Any] = {}
    for name, fmt in EXPORTS.items():
        try:
            fmt.check(layout)
        except SecateursError as err:
            kinds[name] = {"expressible": False, "why": str(err)}
        else:
            kinds[name] = {"expressible": True, "engines": list(fmt.engines_for(layout))}
    return kinds


__all__ = ["EXPORTS", "ExportFormat", "check_export", "engines_for", "export"]
