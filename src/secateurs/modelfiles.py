"""Checks of a model's files that read no weights: every command runs them before loading.

Cheapest evidence first: weight files that are missing or cut off (sizes and headers), JSON
files that do not parse, a GGUF file its parser rejects; then, once torch is needed anyway, the
weights' shapes against ``config.json`` (safetensors headers against a model built on the meta
device). Each problem is a ``ModelFileError`` naming the file or tensor, which the CLI prints in
one line, instead of a traceback from safetensors, gguf, json or transformers, possibly after
minutes of loading.

``check_checkpoint_dir`` and ``read_gguf`` are light (no torch); ``check_shapes`` builds the
model's skeleton on the meta device, which costs the torch / transformers import only.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.errors import ModelFileError

if TYPE_CHECKING:
    from gguf import GGUFReader

INDEX_FILE = "model.safetensors.index.json"
# The JSON files transformers and secateurs read when loading a checkpoint directory.
JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    INDEX_FILE,
    "secateurs.json",
)
GGUF_MAGIC = b"GGUF"
AGAIN = "Copy or download it again."


def check_checkpoint_dir(directory: str | os.PathLike) -> None:
    """Refuse a local HF directory whose JSON files do not parse or whose weights are missing,
    truncated or corrupt (reads JSON files and safetensors headers only)."""
    directory = Path(directory)
    for name in JSON_FILES:
        read_json(directory / name)
    check_weight_files(directory)


def read_json(path: Path) -> Any:
    """The content of a model's JSON file (None if absent), or an error naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path} is not valid JSON ({err}): the file is damaged. {AGAIN}"
        ) from err


def check_weight_files(directory: Path) -> None:
    """Every shard the index names exists, and every safetensors file is whole."""
    index = read_json(directory / INDEX_FILE)
    if isinstance(index, dict):
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [name for name in shards if not (directory / name).is_file()]
        if missing:
            raise ModelFileError(
                f"{directory}: {INDEX_FILE} names {len(shards)} weight files, "
                f"{len(missing)} of them missing ({', '.join(missing[:3])}). {AGAIN}"
            )
    files = sorted(directory.glob("*.safetensors"))
    if not files and not any(directory.glob("pytorch_model*.bin")):
        raise ModelFileError(
            f"{directory} has a config.json but no weights (model.safetensors, sharded "
            "*.safetensors or pytorch_model.bin)."
        )
    for path in files:
        safetensors_header(path)


def safetensors_header(path: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file, after checking the file holds every byte its
    header promises (a truncated copy is named with the bytes it lacks)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or length <= 0 or 8 + length > size:
                raise ValueError("the header is cut off")
            header = json.loads(handle.read(length))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ModelFileError(f"{path} is not a valid safetensors file ({err}). {AGAIN}") from err
    if 8 + length + end > size:
        need = 8 + length + end
        raise ModelFileError(
            f"{path} is truncated: {size:,} bytes, its header needs {need:,} "
            f"({need - size:,} missing). {AGAIN}"
        )
    return tensors


# GGUF metadata value types (gguf.GGUFValueType) → struct format of one scalar
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_header_values(path: str | os.PathLike, keys: set[str]) -> dict[str, Any]:
    """The scalar or string metadata ``keys`` of a GGUF file, read from its header in order
    and stopping once all are found (``GGUFReader`` parses every value, the tokenizer's
    arrays included: seconds for a 49k-word vocabulary). Missing keys are absent; a file it
    cannot follow is left to ``read_gguf``'s checks (empty result)."""
    found: dict[str, Any] = {}
    try:
        with Path(path).open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                return found
            _version, _tensors, count = struct.unpack("<IQQ", handle.read(20))
            for _ in range(count):
                key = _gguf_string(handle)
                value = _gguf_value(handle, struct.unpack("<I", handle.read(4))[0])
                if key in keys:
                    found[key] = value
                    if len(found) == len(keys):
                        break
    except (struct.error, UnicodeDecodeError, ValueError, OSError):
        return {}
    return found


def _gguf_string(handle: Any) -> str:
    (length,) = struct.unpack("<Q", handle.read(8))
    return handle.read(length).decode("utf-8")


def _gguf_value(handle: Any, kind: int) -> Any:
    """One value of type ``kind``; an array is skipped (None)."""
    if kind == _GGUF_STRING:
        return _gguf_string(handle)
    if kind == _GGUF_ARRAY:
        item, length = struct.unpack("<IQ", handle.read(12))
        if item in _GGUF_SCALARS:
            handle.seek(length * struct.calcsize("<" + _GGUF_SCALARS[item]), os.SEEK_CUR)
        else:
            for _ in range(length):
                _gguf_value(handle, item)
        return None
    if kind not in _GGUF_SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    fmt = "<" + _GGUF_SCALARS[kind]
    return struct.unpack(fmt, handle.read(struct.calcsize(fmt)))[0]


def read_gguf(path: str | os.PathLike) -> GGUFReader:
    """The parsed GGUF file (header, metadata, tensor table), or an error saying it is not a
    GGUF file, or is truncated or damaged (the file is memory-mapped, not read).

    Parsed once per process while the file is unchanged: a run checks it more than once (the
    CLI before importing torch, the session, the architecture), and gguf-py parses the whole
    vocabulary each time (3.6 s for SmolLM2's)."""
    path = Path(path)
    stat = path.stat()
    return _parsed_gguf(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _parsed_gguf(path: Path, size: int, mtime_ns: int) -> GGUFReader:
    from gguf import GGUFReader

    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF file: it does not start with the GGUF magic bytes "
            f"(starts with {magic!r})."
        )
    try:
        return GGUFReader(path)
    except Exception as err:  # any parse failure of untrusted bytes means a damaged file
        what = "truncated" if "reshape" in str(err) else "damaged"
        raise ModelFileError(
            f"{path} is a {what} GGUF file ({size:,} bytes): its header or tensor table cannot "
            f"be read ({type(err).__name__}: {err}). {AGAIN}"
        ) from err


def check_shapes(directory: str | os.PathLike) -> None:
    """Refuse safetensors weights whose shapes differ from the model ``config.json`` describes
    (checked against a skeleton on the meta device: no weight is read, no memory used).

    Only parameters whose names match exactly are compared: names transformers converts on
    load (legacy or fused expert layouts) are left to it. Checkpoints whose record gives
    per-layer widths or expert counts, and quantized ones, are checked by their own loaders.
    """
    from secateurs.checkpoint import read_config_dict, recorded_structure

    directory = Path(directory)
    if "quantization_config" in read_config_dict(directory):
        return
    if {"widths", "experts"} & set(recorded_structure(directory)):
        return
    wrong = shape_mismatches(directory, _skeleton_shapes(directory))
    if wrong:
        listed = "; ".join(f"{k}: file {list(a)}, config {list(b)}" for k, a, b in wrong[:3])
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise ModelFileError(
            f"{directory}: the weights do not match config.json: {listed}{more}. The config "
            "and the weights come from different models, or one of them was edited."
        )


def shape_mismatches(
    directory: Path, expected: dict[str, tuple[int, ...]]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(name, shape in the files, shape expected) of every tensor that differs."""
    found: dict[str, tuple[int, ...]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update({k: tuple(v["shape"]) for k, v in safetensors_header(path).items()})
    return [(k, found[k], want) for k, want in expected.items() if found.get(k, want) != want]


def _skeleton_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of the model ``directory``'s config builds, on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from secateurs.checkpoint import read_config

    try:
        config = read_config(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # a config transformers cannot build: loading it will say why
        return {}
    return {name: tuple(p.shape) for name, p in model.named_parameters()}
