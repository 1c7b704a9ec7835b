"""What every pruning run shares, whatever it removes: the result, the ONE record builder, and
the ONE save path. The depth (``api``), width (``width_api``), experts (``experts_api``) and
layer-by-layer (``sequential``, ``streaming``) paths all build their ``secateurs.json`` here, so
a record has one schema: the same top-level keys for every kind, plus the extras a kind has
(``scores``, ``width_scores``, ``expert_scores``, ``search``, ``reconstruction``, ...).

This module imports none of the pipelines, so none of them imports another to reach it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs import __version__
from secateurs.checkpoint import save_checkpoint
from secateurs.plan import Plan
from secateurs.runinfo import count_parameters, peak_rss_mb, versions


@dataclass
class PruneResult:
    """A pruned model (in memory), its plan, the scores that chose it and its record."""

    model: PreTrainedModel
    plan: Plan
    scores: list[Any]
    record: dict[str, Any]
    out: Path | None = None


def run_record(
    model: PreTrainedModel,
    plan: Plan,
    *,
    criterion: dict[str, Any],
    calibration: dict[str, Any] | None,
    before: int,
    seconds: float,
    source: str | None,
    parameters: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The ``secateurs.json`` record of a pruning run (``model`` already pruned; ``before``
    its parameter count before). ``extra`` adds the keys only some kinds have."""
    return {
        "secateurs_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": source,
        "model_type": model.config.model_type,
        "units": list(plan.parts),
        "plan": plan.to_dict(),
        "criterion": criterion,
        "calibration": calibration,
        "parameters": {"before": before, "after": count_parameters(model), **(parameters or {})},
        "timings": {"scoring_s": round(seconds, 3), "peak_rss_mb": round(peak_rss_mb(), 1)},
        "versions": versions(),
        **extra,
    }


def finish(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    plan: Plan,
    record: dict[str, Any],
    *,
    scores: list[Any] | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> PruneResult:
    """Save the pruned model with its record to ``out`` (if given): the in-memory save path of
    every kind. (The layer-by-layer paths write shards themselves, with the same record.)"""
    if out is not None:
        save_checkpoint(model, tokenizer, out, record, overwrite=overwrite)
    return PruneResult(model, plan, scores or [], record, Path(out) if out else None)
