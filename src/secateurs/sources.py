"""What a run reads — a model object, a directory, a GGUF file, an alias or a hub id — opened
as a session: in memory (``ResidentSession``) or one layer at a time from disk
(``LazySession``), picked from the spec and the checkpoint's size after the spec was checked
against the model's config (nothing heavy is read before that)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from secateurs.errors import ConfigError
from secateurs.runinfo import map_large_blocks
from secateurs.session.base import Session
from secateurs.session.resident import ResidentSession
from secateurs.spec import PruneSpec

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")


def open_session(
    source: Any,
    spec: PruneSpec,
    tokenizer: Any = None,
    work: str | os.PathLike | None = None,
    scores_only: bool = False,
) -> Session:
    """A session over ``source`` (a model object, a directory, a GGUF file, an alias or a hub
    id) for ``spec``; ``work``: where a lazy session spills changed layers; ``scores_only``:
    the run scores and removes nothing (its budget is not checked)."""
    from secateurs.preflight import check_config, check_source

    if isinstance(source, PreTrainedModel):
        if spec.mode.mode in ("sequential", "stream"):
            raise ConfigError(
                "--sequential/--stream read a checkpoint from disk, not a model object."
            )
        check_config(spec, source.config, not scores_only)
        return ResidentSession(source, tokenizer, getattr(source, "name_or_path", None))
    from secateurs.models import resolve_model

    check_source(spec, source, not scores_only)  # config.json and the files' headers
    location = resolve_model(source)
    config = _config(location)
    if config is not None:
        check_config(spec, config, not scores_only)
    mode, switched = _mode(spec, location)
    session = (
        _resident(source, location, spec)
        if mode == "memory"
        else _lazy(location, spec, work, mode, tokenizer)
    )
    if switched:
        session.notes["switched"] = switched
    return session


def _config(location: str) -> Any:
    if not Path(location).is_dir():
        return None  # a hub id: its config comes with the model
    from secateurs.checkpoint import read_config

    return read_config(location)


def _dtype(spec: PruneSpec) -> torch.dtype:
    name = spec.mode.dtype or "float32"
    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got {name!r}.")
    return getattr(torch, name)


def _mode(spec: PruneSpec, location: str) -> tuple[str, str | None]:
    """(memory, sequential or stream; why it was switched to, if it was): ``auto`` reads from
    disk when loading whole would need more than ``--max-memory`` (default: 80% of the memory
    available now), and says so in one line."""
    asked = spec.mode.mode
    if asked != "auto":
        if asked != "memory" and not Path(location).is_dir():
            raise ConfigError(f"--{asked} needs a local checkpoint directory; {location} is not.")
        return asked, None
    need, budget = _memory_need(spec, location)
    if need is None or need <= budget:
        return "memory", None
    why = (
        f"{location} needs {need / 2**30:.1f} GiB in memory (budget {budget / 2**30:.1f} GiB): "
        "reading it one layer at a time (--sequential)."
    )
    print(why)
    return ("stream" if spec.selection.explicit and not spec.fit.heal else "sequential"), why


def _memory_need(spec: PruneSpec, location: str) -> tuple[int | None, float]:
    from secateurs.session.lazy import available_memory, bytes_to_load
    from secateurs.shards import CheckpointReader

    if not Path(location).is_dir():
        return None, 0.0
    try:
        CheckpointReader(location)
    except ConfigError:  # not safetensors: only the in-memory path reads it
        return None, 0.0
    budget = spec.mode.max_memory * 2**30 if spec.mode.max_memory else 0.8 * available_memory()
    return bytes_to_load(location, _dtype(spec)), budget


def _resident(source: Any, location: str, spec: PruneSpec) -> ResidentSession:
    from secateurs.models import load_model

    model, tokenizer = load_model(
        location, dtype=_dtype(spec), device=spec.mode.device, require_adapter=True
    )
    session = ResidentSession(model, tokenizer, source)
    session.notes["source_dtype"] = _source_dtype(str(source), location)
    return session


def _source_dtype(source: str, location: str) -> str:
    """The dtype the output keeps: the source checkpoint's; float32 for a dequantized GGUF."""
    if source.endswith(".gguf") or location != source and not Path(source).is_dir():
        return "float32"
    from secateurs.checkpoint import read_config
    from secateurs.shards import checkpoint_dtype

    config = read_config(location) if Path(location).is_dir() else None
    return str(checkpoint_dtype(config)).removeprefix("torch.") if config else "float32"


def _lazy(location: str, spec: PruneSpec, work: Any, mode: str, tokenizer: Any) -> Session:
    from secateurs.models import check_model_files
    from secateurs.session.lazy import LazyModel, LazySession

    if work is None:
        raise ConfigError("Reading a checkpoint one layer at a time writes to --out; give one.")
    check_model_files(location)  # weights whose shapes differ from config.json
    # before the skeleton is built: its parameters are allocated whole and dropped to ``meta``,
    # which otherwise can leave a heap of ~2 GB (at 14B) that later tensors are carved from
    map_large_blocks()
    lazy = LazyModel(location, _dtype(spec), spec.mode.device)
    lazy.stored_linears = stored_linears_allowed(spec)
    session = LazySession(lazy, work, tokenizer, stream=mode == "stream")
    from secateurs.shards import checkpoint_dtype

    session.notes["source_dtype"] = str(checkpoint_dtype(lazy.config)).removeprefix("torch.")
    return session


def stored_linears_allowed(spec: PruneSpec) -> bool:
    """Whether a lazy session may hold Linear weights in their stored 16-bit dtype: width
    units scored by a criterion that reads weights only through matmuls and widening copies,
    and fits that write whole new weights (reconstruction, compensation). Healing, depth
    surgery and gradients modify or differentiate weights in place, so they get the compute
    dtype."""
    from secateurs.criteria import CRITERIA

    if not spec.units or set(spec.units) - {"heads", "channels"}:
        return False
    return all(
        getattr(CRITERIA.get(n), "reads_stored_weights", False) for n in spec.criterion.names
    )


__all__ = ["open_session", "stored_linears_allowed"]
