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
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
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
    from secateurs.surgery import skipped_branches

    skipped = skipped_branches(model)
    record = dict(record)
    record["structure"] = {"skipped_branches": [list(unit) for unit in skipped]}
    record["loading"] = loading_note(bool(skipped))
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
    log.info("Saved to %s", out)
    return Path(out)


def loading_note(needs_secateurs: bool) -> dict[str, Any]:
    if not needs_secateurs:
        return {
            "plain_transformers": True,
            "how": "AutoModelForCausalLM.from_pretrained(dir) loads it exactly; so can other engines.",
        }
    return {
        "plain_transformers": False,
        "how": (
            "Removed attention/MLP branches are not expressible in a Hugging Face config: load with "
            "secateurs.load_model(dir). Plain from_pretrained would re-create the missing branches "
            "with random weights; vLLM and llama.cpp converters cannot load it."
        ),
    }


def load_checkpoint(location: str, dtype: torch.dtype | str = torch.float32) -> tuple[PreTrainedModel, Tokenizer]:
    """Load an HF directory or hub id; rebuild secateurs structure recorded beside it."""
    skipped = read_record(location).get("structure", {}).get("skipped_branches", [])
    tokenizer = AutoTokenizer.from_pretrained(location)
    if not skipped:
        return AutoModelForCausalLM.from_pretrained(location, dtype=dtype), tokenizer
    return _load_with_structure(Path(location), skipped, dtype), tokenizer


def _load_with_structure(directory: Path, skipped: list[list], dtype: torch.dtype | str) -> PreTrainedModel:
    from secateurs.surgery import skip_branch
    from secateurs.adapters import adapter_for
    from secateurs.units import Unit

    config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    for layer, kind in skipped:
        skip_branch(model, adapter, Unit(int(layer), kind))
    load_weights_exactly(model, directory)
    if dtype not in ("auto", None):
        model = model.to(dtype)
    return model


def load_weights_exactly(model: PreTrainedModel, directory: Path) -> None:
    """Load every safetensors shard; only tied parameters may be absent from the files."""
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{directory}: unexpected weights {result.unexpected_keys[:5]}")
    model.tie_weights()
    expected = model.state_dict()
    loaded_ptrs = {expected[k].data_ptr() for k in state}
    untied = [k for k in result.missing_keys if expected[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"{directory}: weights missing from the checkpoint: {untied[:5]}")
