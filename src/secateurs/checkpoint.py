"""Atomic saving and exact reloading of (pruned) checkpoints.

A pruned model is saved as a standard HF directory plus ``secateurs.json`` (the run record).
Removed blocks are plain config changes that any engine loads; removed branches are not
expressible in HF configs, so the record's ``structure`` lets secateurs rebuild them exactly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.errors import OutputExistsError

log = logging.getLogger(__name__)

RECORD_FILE = "secateurs.json"


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Fail early (before any costly work) if ``out`` exists and may not be replaced."""
    path = Path(out)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"Output directory {path} exists; pass --overwrite to replace it.")
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"Output path {path} exists and is not a directory.")
    return path


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``out`` only if the block succeeds.

    A crash or Ctrl-C inside the block leaves ``out`` as it was (absent, or the old contents).
    """
    target = check_output_dir(out, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    out: str | os.PathLike,
    record: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer and run record to ``out`` atomically."""
    from secateurs.export import engines_for_model
    from secateurs.surgery import skipped_branches

    skipped = skipped_branches(model)
    layer_widths = width_structure(model)
    record = dict(record)
    record["structure"] = {"skipped_branches": [list(unit) for unit in skipped]}
    if layer_widths:
        record["structure"]["widths"] = layer_widths
    record["loading"] = loading_note(bool(skipped), bool(layer_widths))
    record["engines"] = engines_for_model(model)  # per output kind (secateurs export --to ...)
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
    log.info("Saved to %s", out)
    return Path(out)


def width_structure(model: PreTrainedModel) -> dict[str, list[int]] | None:
    """Per-layer widths, if a model built from the config alone would have other shapes."""
    from secateurs.adapters import adapter_for
    from secateurs.width import widths

    adapter = adapter_for(model)
    if adapter.heads is None and adapter.channels is None:
        return None
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(model.config)
    actual = widths(model, adapter)
    if actual == widths(fresh, adapter):
        return None
    return {
        "heads": [w.heads for w in actual],
        "kv_heads": [w.kv_heads for w in actual],
        "channels": [w.channels for w in actual],
    }


def loading_note(needs_secateurs: bool, widths: bool = False) -> dict[str, Any]:
    if widths:
        return {
            "plain_transformers": False,
            "how": (
                "Per-layer widths (attention heads / MLP channels) are not expressible in this "
                "model's Hugging Face config: load with secateurs.load_model(dir), which rebuilds "
                "each layer's shapes from secateurs.json. Plain from_pretrained fails on the shape "
                "mismatch; vLLM and llama.cpp converters cannot load it (use --uniform-widths on "
                "a family whose config has head_dim, e.g. LLaMA, for a portable checkpoint)."
            ),
        }
    if not needs_secateurs:
        return {
            "plain_transformers": True,
            "how": "AutoModelForCausalLM.from_pretrained(dir) loads it exactly; other engines too.",
        }
    return {
        "plain_transformers": False,
        "how": (
            "Removed attention/MLP branches are not expressible in a Hugging Face config: load "
            "with secateurs.load_model(dir). Plain from_pretrained would re-create the missing "
            "branches with random weights; vLLM and llama.cpp converters cannot load it."
        ),
    }


def load_checkpoint(
    location: str, dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load an HF directory or hub id; rebuild secateurs structure recorded beside it."""
    structure = read_record(location).get("structure", {})
    skipped = structure.get("skipped_branches", [])
    tokenizer = _tokenizer(location)
    if structure.get("widths"):
        return _load_with_widths(Path(location), skipped, structure["widths"], dtype), tokenizer
    if not skipped:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype), tokenizer
    return _load_with_structure(Path(location), skipped, dtype), tokenizer


def _tokenizer(location: str) -> Tokenizer | None:
    """The tokenizer beside a checkpoint; None for a local directory saved without one."""
    path = Path(location)
    if path.is_dir() and not any(path.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(location)


def _load_with_widths(
    directory: Path,
    skipped: list[list],
    layer_widths: dict[str, list[int]],
    dtype: torch.dtype | str,
) -> PreTrainedModel:
    """Load through transformers (key renames, ties), cut every layer to its recorded widths,
    then fill the weights transformers could not place because of their shapes.

    Strict: every mismatched weight must be in the files with the recorded shape.
    """
    from safetensors.torch import load_file

    from secateurs.adapters import adapter_for
    from secateurs.surgery import skip_branch
    from secateurs.units import Unit
    from secateurs.width import layer_width, prune_layer

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, ignore_mismatched_sizes=True, output_loading_info=True
    )
    adapter = adapter_for(model)
    for layer, kind in skipped:
        skip_branch(model, adapter, Unit(int(layer), kind))
    for index, block in enumerate(adapter.layers(model)):
        now = layer_width(adapter, block)
        for kind, have, want in (
            ("heads", now.kv_heads, layer_widths["kv_heads"][index]),
            ("channels", now.channels, layer_widths["channels"][index]),
        ):
            if want < have:
                prune_layer(model, adapter, index, kind, range(want, have))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [m[0] if isinstance(m, (tuple, list)) else m for m in info["mismatched_keys"]]:
            if key not in state or key not in params or params[key].shape != state[key].shape:
                raise ValueError(f"{directory}: weight {key} does not match the recorded widths.")
            params[key].copy_(state[key].to(params[key].dtype))
    return model


def _load_with_structure(
    directory: Path, skipped: list[list], dtype: torch.dtype | str
) -> PreTrainedModel:
    """Load through transformers (key renames, ties, dtype), then drop the recorded branches.

    The removed branches' weights are absent from the files, so transformers initialises them
    randomly; they are replaced at once, and any *other* missing weight is an error.
    """
    from secateurs.adapters import adapter_for
    from secateurs.surgery import skip_branch
    from secateurs.units import Unit

    model, info = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, output_loading_info=True
    )
    adapter = adapter_for(model)
    expected_missing = set()
    for layer, kind in skipped:
        unit = Unit(int(layer), kind)
        prefix = f"{adapter.layers_path}.{unit.layer}."
        for module, name in zip(
            adapter.unit_modules(model, unit.layer, kind),
            adapter.sub_block(kind, model.config).module_names(),
            strict=True,
        ):
            expected_missing |= {f"{prefix}{name}.{p}" for p, _ in module.named_parameters()}
        skip_branch(model, adapter, unit)
    unexplained = sorted(set(info["missing_keys"]) - expected_missing)
    if unexplained or info["unexpected_keys"]:
        raise ValueError(
            f"{directory}: checkpoint does not match its recorded structure "
            f"(missing {unexplained[:5]}, unexpected {info['unexpected_keys'][:5]})."
        )
    return model
