"""Importance criteria, one file each, registered in ``CRITERIA`` by name."""

from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion")

# Explicit imports (no silent discovery): each module registers its criterion on import.
from secateurs.criteria import (  # noqa: E402,F401
    activation,
    block_influence,
    experts,
    fluctuation,
    hywia,
    influence,
    magnitude,
    mini_llm,
    ppl,
    taylor,
)

__all__ = ["CRITERIA", "Criterion", "ScoringContext"]
