"""Safetensors IO shared by every writer: what a checkpoint holds (``CheckpointReader``, read a
row block at a time), and the one weights writer (``write_weights``) through which the in-memory
save and the layer-by-layer save both go.

Shards are cut by ``huggingface_hub.split_torch_state_dict_into_shards`` (``save_pretrained``'s
own function) and written in the byte layout safetensors uses (tensors by descending dtype rank,
then name; header padded to 8 bytes), so a checkpoint is byte for byte what ``save_pretrained``
writes, whether its tensors come from memory, from spilled layers or from the source checkpoint
(tested). A tensor may be given as consecutive row blocks, so none need be in memory whole.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.core_model_loading import dot_natural_key, revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from secateurs.errors import ConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD = "50GB"  # save_pretrained's default: the streaming output matches it
CHUNK_BYTES = 64 * 2**20  # rows copied at a time: memory stays far below one large tensor

# safetensors writes tensors by descending dtype rank, then by name (its Dtype enum order).
SAFETENSORS_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 4),
    torch.int8: ("I8", 5),
    torch.float8_e5m2: ("F8_E5M2", 6),
    torch.float8_e4m3fn: ("F8_E4M3", 7),
    torch.int16: ("I16", 9),
    torch.uint16: ("U16", 10),
    torch.float16: ("F16", 11),
    torch.bfloat16: ("BF16", 12),
    torch.int32: ("I32", 13),
    torch.uint32: ("U32", 14),
    torch.float32: ("F32", 15),
    torch.float64: ("F64", 17),
    torch.int64: ("I64", 18),
    torch.uint64: ("U64", 19),
}


@dataclass(frozen=True)
class TensorSpec:
    """What a safetensors header says of one tensor, before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StoredTensor(TensorSpec):
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    offset: int  # of its first byte, from the start of the file

    @property
    def row_nbytes(self) -> int:
        """Bytes of one row (along the first dimension); 0 for a 0-d or empty tensor."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else 0

    def read(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (the whole tensor by default) by plain reads into a new tensor.

        Not through a memory map: pages read through a mapping count in this process's RSS
        until it is closed (hundreds of MB a layer on a 14B model); a read leaves them in the
        page cache, which the kernel reclaims.
        """
        shape = list(self.shape)
        if shape:
            stop = shape[0] if stop is None else min(stop, shape[0])
            shape[0] = max(0, stop - start)
        out = torch.empty(shape, dtype=self.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        with open(self.file, "rb", buffering=0) as handle:
            handle.seek(self.offset + start * self.row_nbytes)
            _read_into(handle, buffer, self)
        return out


def _read_into(handle: BinaryIO, buffer: memoryview, stored: StoredTensor) -> None:
    done = 0
    while done < len(buffer):  # one read() returns at most ~2 GiB on Linux
        got = handle.readinto(buffer[done:])
        if not got:
            raise ConfigError(f"{stored.file}: {stored.name} ends before its header says.")
        done += got


def stored_tensors(path: str | os.PathLike) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, from its header alone."""
    path = Path(path)
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    dtypes = {code: dtype for dtype, (code, _) in SAFETENSORS_DTYPES.items()}
    found = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in dtypes:
            raise ConfigError(f"{path}: {name} has dtype {entry['dtype']}, which is not read here.")
        start, _ = entry["data_offsets"]
        dtype, shape = dtypes[entry["dtype"]], tuple(entry["shape"])
        found[name] = StoredTensor(name, dtype, shape, path, 8 + length + start)
    return found


def write_order(specs: Iterable[TensorSpec]) -> list[TensorSpec]:
    """Tensors in the order safetensors writes them: descending dtype rank, then name."""
    unknown = sorted({str(s.dtype) for s in specs if s.dtype not in SAFETENSORS_DTYPES})
    if unknown:
        raise ConfigError(f"Streaming cannot write tensors of dtype {unknown}.")
    return sorted(specs, key=lambda s: (-SAFETENSORS_DTYPES[s.dtype][1], s.name))


def header_bytes(ordered: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """The length-prefixed JSON header, padded with spaces to 8 bytes as safetensors does."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for spec in ordered:
        end = offset + spec.nbytes
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype][0],
            "shape": list(spec.shape),
            "data_offsets": [offset, end],
        }
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(
    path: Path,
    specs: list[TensorSpec],
    read: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors come one at a time from ``read(name)``: a tensor,
    or its consecutive row blocks (so no tensor need be in memory whole)."""
    ordered = write_order(specs)
    with open(path, "wb") as handle:
        handle.write(header_bytes(ordered, metadata))
        for spec in ordered:
            _write_tensor(handle, read(spec.name), spec)


def _write_tensor(
    handle: BinaryIO, data: torch.Tensor | Iterable[torch.Tensor], spec: TensorSpec
) -> None:
    written = 0
    for block in [data] if isinstance(data, torch.Tensor) else data:
        if block.dtype != spec.dtype or tuple(block.shape[1:]) != spec.shape[1:]:
            raise ConfigError(
                f"{spec.name}: expected {spec.dtype} {list(spec.shape)}, read "
                f"{block.dtype} {list(block.shape)}."
            )
        flat = block.detach().contiguous().reshape(-1)
        if flat.numel():
            handle.write(flat.view(torch.uint8).numpy().data)  # a view: no copy
        written += flat.numel() * flat.element_size()
    if written != spec.nbytes:
        raise ConfigError(f"{spec.name}: wrote {written} bytes, expected {spec.nbytes}.")


class CheckpointReader:
    """Lazy access to the tensors of a safetensors checkpoint (one file or an indexed set)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.files = self._weight_map()
        self._headers: dict[Path, dict[str, StoredTensor]] = {}

    def _weight_map(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            mapping = json.loads(index.read_text())["weight_map"]
            return {name: self.directory / file for name, file in mapping.items()}
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise ConfigError(
                f"{self.directory} has no {SINGLE_FILE} or {INDEX_FILE}: streaming needs a "
                "safetensors checkpoint (GGUF and .bin models take the in-memory path)."
            )
        return dict.fromkeys(stored_tensors(single), single)

    def names(self) -> set[str]:
        return set(self.files)

    def stored(self, name: str) -> StoredTensor:
        """Where ``name`` lies (each file's header read once)."""
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = stored_tensors(path)
        return self._headers[path][name]

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor with ``name``'s dtype and shape (nothing read but the header)."""
        stored = self.stored(name)
        return torch.empty(stored.shape, dtype=stored.dtype, device="meta")

    def read(self, name: str) -> torch.Tensor:
        return self.stored(name).read()

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (sorted, unique) of a 2-d tensor, read a block at a time."""
        parts, start = [], 0
        for block in self.blocks(name):
            inside = index[(index >= start) & (index < start + len(block))]
            parts.append(block[inside - start].clone())
            start += len(block)
        return torch.cat(parts)

    def blocks(self, name: str, max_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """``name`` as consecutive row blocks of at most ``max_bytes`` (whole if 0-d/1-d)."""
        yield from row_blocks(self.stored(name), max_bytes)


def row_blocks(stored: StoredTensor, max_bytes: int | None = None) -> Iterator[torch.Tensor]:
    """``stored`` as consecutive row blocks of at most ``max_bytes`` (whole if 0-d/1-d)."""
    if len(stored.shape) < 2:
        yield stored.read()
        return
    step = max(1, (max_bytes or CHUNK_BYTES) // max(1, stored.row_nbytes))
    for start in range(0, stored.shape[0], step):
        yield stored.read(start, start + step)


def meta_skeleton(source: str | os.PathLike) -> PreTrainedModel:
    """The model of ``source`` with every tensor on the meta device (no memory, no weights)."""
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=checkpoint_dtype(config))


def checkpoint_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def saved_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors ``save_pretrained`` would write for ``model``, in its order and names.

    As for a model loaded by ``from_pretrained``: tied copies dropped, natural-key order, and
    the family's checkpoint renamings reverted. The values are the model's own (meta) tensors,
    so ``id()`` links a saved name to a module parameter.
    """
    state = remove_tied_weights_from_state_dict(model.state_dict(keep_vars=True), model)
    state = dict(sorted(state.items(), key=lambda item: dot_natural_key(item[0])))
    return revert_weight_conversion(model, state)


def write_weights(
    directory: Path,
    specs: dict[str, TensorSpec],
    read: Callable[[str], torch.Tensor | Iterable[torch.Tensor]],
    total_parameters: int,
    max_shard_size: str | int | None = None,
) -> None:
    """Write tensors ``specs`` (name → dtype and shape, in ``save_pretrained``'s order) as
    ``save_pretrained`` shards them (``DEFAULT_SHARD``); ``read(name)`` gives a tensor or its
    row blocks."""
    max_shard_size = max_shard_size or DEFAULT_SHARD
    sized = {n: torch.empty(s.shape, dtype=s.dtype, device="meta") for n, s in specs.items()}
    split = split_torch_state_dict_into_shards(
        sized, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(directory / filename, [specs[n] for n in names], read, {"format": "pt"})
    if split.is_sharded:
        index = {
            "metadata": {"total_parameters": total_parameters, **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        content = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (directory / INDEX_FILE).write_text(content, encoding="utf-8")
