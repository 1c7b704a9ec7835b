"""secateurs: structured pruning of Hugging Face causal LMs, with honest numbers.

The public names are imported on first use, so ``import secateurs`` (and ``secateurs --help``)
does not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CalibrationConfig": "secateurs.data",
    "CriterionSpec": "secateurs.api",
    "PPLProtocol": "secateurs.evaluate.ppl",
    "Plan": "secateurs.plan",
    "PruneResult": "secateurs.prune_flow",
    "ScoreResult": "secateurs.api",
    "apply_plan": "secateurs.surgery",
    "load_model": "secateurs.models",
    "perplexity": "secateurs.evaluate.ppl",
    "prune": "secateurs.api",
    "score_units": "secateurs.api",
    "stream_prune": "secateurs.api",
    "sequential_prune": "secateurs.sequential",
    "sequential_prune_experts": "secateurs.sequential_experts",
    "LazyModel": "secateurs.lazy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'secateurs' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
