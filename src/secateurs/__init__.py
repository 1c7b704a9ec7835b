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
    "PPLProtocol": "secateurs.evaluate.ppl",
    "Plan": "secateurs.plan",
    "PruneResult": "secateurs.run",
    "PruneSpec": "secateurs.spec",
    "ScoreResult": "secateurs.scores",
    "apply_plan": "secateurs.units",
    "load_model": "secateurs.models",
    "perplexity": "secateurs.evaluate.ppl",
    "prune": "secateurs.run",
    "score": "secateurs.run",
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
