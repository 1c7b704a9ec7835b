"""The files of a (pruned) checkpoint: the run record, ``config.json`` and its mark.

A pruned model is saved as a standard HF directory plus ``secateurs.json`` (the run record).
Removed blocks are plain config changes that any engine loads. Removed branches and per-layer
widths are not expressible in HF configs: their ``config.json`` gets a ``model_type`` and
``architectures`` no other loader knows (``secateurs-pruned-llama``), so a plain
``from_pretrained``, vLLM or a llama.cpp converter fails loudly instead of filling the missing
branches with random weights; the original values are kept under ``secateurs_original`` and the
record's ``structure`` lets ``secateurs.load_model`` rebuild the model exactly.

Before writing, the model is compared with one built from its own config (on the meta device):
any difference a reload would not repair (a layer-index dependent constant, a sparse/dense MLP
pattern) is refused instead of being saved silently wrong.

Heavy libraries are imported inside functions: the CLI imports this module to print ``--help``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.errors import ModelFileError
from secateurs.outputs import atomic_directory, check_disk_space, check_output_dir

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)

RECORD_FILE = "secateurs.json"
MARK_KEY = "secateurs_original"  # config.json: the real model_type / architectures
MARK_PREFIX = "secateurs-pruned-"
# Module attributes that describe how a model runs now, not what a reload builds.
RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})

__all__ = [
    "MARK_KEY",
    "RECORD_FILE",
    "atomic_directory",
    "check_disk_space",
    "check_output_dir",
    "read_config",
    "read_record",
    "write_json",
]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# What ``secateurs.json`` may record that a Hugging Face config cannot describe.
STRUCTURE_KEYS = ("skipped_branches", "widths", "experts")


def recorded_structure(directory: str | os.PathLike) -> list[str]:
    """The structure kinds (``STRUCTURE_KEYS``) present in ``directory``'s record; empty for a
    checkpoint whose config alone describes every shape."""
    structure = read_record(directory).get("structure", {})
    return [key for key in STRUCTURE_KEYS if structure.get(key)]


# --- config.json --------------------------------------------------------------------------------


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a local model directory, as written (a clear error if it is not JSON)."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path} is not valid JSON ({err}); the model files are damaged."
        ) from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelFileError(f"{path} has no 'model_type': not a Hugging Face model config.")
    return data


def original_model_type(config: dict[str, Any]) -> str:
    """The architecture's model type, also for configs marked by secateurs."""
    return config.get(MARK_KEY, {}).get("model_type") or config["model_type"]


def unmarked_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` as the architecture wrote it: secateurs' loud-failing mark undone."""
    data = read_config_dict(directory)
    if MARK_KEY in data:
        original = data.pop(MARK_KEY)
        data.pop("secateurs_load_with", None)
        data["model_type"] = original["model_type"]
        data["architectures"] = original.get("architectures")
    return data


def read_config(directory: str | os.PathLike) -> PretrainedConfig:
    """The config of a local model directory, with secateurs' loud-failing mark undone."""
    from transformers import AutoConfig

    if MARK_KEY not in read_config_dict(directory):
        return AutoConfig.from_pretrained(directory)
    data = unmarked_config_dict(directory)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config._name_or_path = str(directory)
    return config


# Appended to the marked model_type: transformers' refusal quotes the model_type, then advises
# upgrading transformers, so the model_type itself must say what works instead.
MARK_ADVICE = (
    "; no transformers version loads this pruned model: use secateurs.load_model(dir), "
    "or convert it for an engine with 'secateurs export'"
)


def mark_config(directory: Path) -> None:
    """Make ``config.json`` unloadable by anything but secateurs (see module docstring)."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    original = {"model_type": data["model_type"], "architectures": data.get("architectures")}
    data["model_type"] = MARK_PREFIX + original["model_type"] + MARK_ADVICE
    data["architectures"] = [f"SecateursPruned{a}" for a in original["architectures"] or []]
    data[MARK_KEY] = original
    data["secateurs_load_with"] = (
        "secateurs.load_model(dir): removed branches or per-layer widths (see secateurs.json)"
    )
    write_json(path, data)


# --- saving -------------------------------------------------------------------------------------
