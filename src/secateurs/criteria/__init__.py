"""Importance criteria, one file each, registered in ``CRITERIA`` by name."""

from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.registry import Registry

CRITERIA: Registry[type[Criterion]] = Registry("criterion")

# Explicit imports (no silent discovery): each module registers its criterion on import.
from secateurs.criteria import block_influence, magnitude, ppl, taylor  # noqa: E402,F401

__all__ = ["CRITERIA", "Criterion", "ScoringContext"]
