"""The one checkpoint writer: a session's pruned model → a standard HF directory + record.

Both sessions go through ``write_checkpoint``: the config (marked when only secateurs can load
the structure), the weights (``shards.write_weights``: from memory, or from the lazy session's
spilled layers and the source checkpoint), the tokenizer, ``secateurs.json`` and the model card,
written atomically into a temporary sibling that replaces ``out`` only when complete.

The weights keep the source checkpoint's dtype (a bfloat16 checkpoint computed in float32 is
saved in bfloat16, as ``save_pretrained`` of the loaded model would); a model converted from a
quantized GGUF is saved in float32, since its dequantized values are not representable in 16
bits. The record says which (``parameters.saved_dtype``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GenerationConfig

from secateurs.card import write_card
from secateurs.checkpoint import RECORD_FILE, mark_config, write_json
from secateurs.outputs import atomic_directory
from secateurs.plan import RECORD_KEYS
from secateurs.session.base import Session
from secateurs.shards import TensorSpec, saved_state, write_weights
from secateurs.structure import structure_record

log = logging.getLogger(__name__)


def write_checkpoint(
    session: Session,
    out: str | os.PathLike,
    record: dict[str, Any],
    kept: tuple[int, ...],
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``session``'s (cut) model to ``out``; ``kept``: the original indices of the
    layers it keeps. Returns the record written."""
    model = session.model
    dtype = saved_dtype(session)
    record = {**record, **structure_record(model)}
    record["parameters"]["saved_dtype"] = str(dtype).removeprefix("torch.")
    specs, read = _tensors(session, kept, dtype)
    needed = sum(spec.nbytes for spec in specs.values()) + (20 << 20)
    needed -= session.freed_while_writing()
    start = time.perf_counter()
    with atomic_directory(out, overwrite=overwrite, needed=needed) as tmp:
        _write_config(session, dtype, tmp)
        write_weights(tmp, specs, read, model.num_parameters())
        _write_tokenizer(session, tmp)
        if "timings" in record:  # a run's record: writing is its last phase (the rest: < 1 s)
            record["timings"] = _with_write(record["timings"], _since(start))
        if not record["loading"]["plain_transformers"]:
            mark_config(tmp)
        write_json(tmp / RECORD_FILE, record)
        if any(record.get(key) for key in RECORD_KEYS):  # a run's record, not a bare save
            write_card(tmp, name=Path(out).name)
    log.info("Saved to %s", out)
    return record


def _since(start: float) -> float:
    return round(time.perf_counter() - start, 3)


def _with_write(timings: dict[str, float], seconds: float) -> dict[str, float]:
    """The phases' times in their order (load, scoring, cut, write), then the totals."""
    phases = {k: v for k, v in timings.items() if k not in ("cpu_s", "peak_rss_mb")}
    return {**phases, "write_s": seconds, **{k: v for k, v in timings.items() if k not in phases}}


def saved_dtype(session: Session) -> torch.dtype:
    """The source checkpoint's dtype (see the module docstring)."""
    stored = session.notes.get("source_dtype")
    if isinstance(stored, str) and hasattr(torch, stored):
        return getattr(torch, stored)
    return next(session.model.parameters()).dtype


def _tensors(
    session: Session, kept: tuple[int, ...], dtype: torch.dtype
) -> tuple[dict[str, TensorSpec], Callable]:
    """Each output tensor's spec, and how to read it (a tensor or its row blocks)."""
    if hasattr(session, "output_tensors"):  # the lazy session: spilled layers + the source
        return session.output_tensors(kept)
    state = saved_state(session.model)
    cast = {n: (dtype if t.is_floating_point() else t.dtype) for n, t in state.items()}
    specs = {n: TensorSpec(n, cast[n], tuple(t.shape)) for n, t in state.items()}
    return specs, lambda name: state[name].detach().to("cpu", cast[name]).contiguous()


def _write_config(session: Session, dtype: torch.dtype, tmp: Path) -> None:
    model = session.model
    model.config.dtype = dtype
    model.config.save_pretrained(tmp)
    generation = None
    if session.source is not None and Path(session.source).is_dir():
        try:
            generation = GenerationConfig.from_pretrained(session.source)
        except OSError:  # no generation_config.json: the model's own default, as transformers
            generation = None
    if generation is None and model.can_generate():
        generation = model.generation_config
    if generation is not None:
        generation.save_pretrained(tmp)


def _write_tokenizer(session: Session, tmp: Path) -> None:
    tokenizer = session.tokenizer
    if tokenizer is None and session.source is not None and Path(session.source).is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(session.source)
        except (OSError, ValueError):
            log.warning("%s has no loadable tokenizer: the output has none either.", session.source)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    out: str | os.PathLike,
    record: dict[str, Any] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Save a (pruned) model object and its tokenizer through the one writer (a run's record
    may be given; its ``plan``, if any, is what was cut)."""
    from secateurs.session.resident import ResidentSession

    session = ResidentSession(model, tokenizer)
    record = {**(record or {})}
    record["parameters"] = {**record.get("parameters", {})}
    write_checkpoint(session, out, record, tuple(range(session.num_layers)), overwrite)
    return Path(out)
