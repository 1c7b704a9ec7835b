"""Importance criteria, one file each, registered in ``CRITERIA`` by name.

The table below declares each criterion (module, aliases, unit kinds, summary), so that
``secateurs ls`` and name checks read it without importing torch; a criterion's module is
imported when the criterion is first used, and its registration is checked against the table.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from secateurs.registry import Registry

if TYPE_CHECKING:
    from secateurs.criteria.base import Criterion

CRITERIA: Registry[type[Criterion]] = Registry("criterion")

# name, module, aliases, unit kinds, summary (as the class states them), options (its
# constructor's keywords: the spec checks --option names without importing the module)
TABLE = (
    ("activation", "activation", ("wanda",), "heads channels",
     "Σ|W_ij|·‖X_j‖₂ over the group's output-projection columns (Wanda, structured)",
     ""),
    ("block-influence", "block_influence", ("bi", "shortgpt"), "block attn mlp",
     "mean over tokens of 1 − cos(stream before, stream after) the unit (ShortGPT)",
     ""),
    ("fluctuation", "fluctuation", ("flap",), "heads channels",
     "Var(x_j)·‖W[:, j]‖² of the output projection's inputs, with bias compensation (FLAP)",
     "compensate"),
    ("frequency", "experts", ("router-frequency",), "experts",
     "fraction of calibration tokens whose router top-k picks the expert",
     ""),
    ("hywia", "hywia", (), "heads channels",
     "fine (|W·G| per weight) and coarse (group ΔL after re-fit) importance, fused by attention",
     "temperature coarse"),
    ("influence", "influence", ("ifso",), "heads channels",
     "predicted loss change ⟨G,ΔŴ⟩ + ½tr(S·W_c[(A⁻¹)_cc]⁻¹W_cᵀ) after the LS re-fit",
     "damping first_order intercept"),
    ("magnitude", "magnitude", (), "block attn mlp heads channels experts",
     "Σ|W|^p over the unit's weight matrices (p=1 default)",
     "p"),
    ("mini-llm", "mini_llm", ("minillm",), "heads channels",
     "Σ|W|·‖X‖ × |gate gradient| per group, the gradient from forward passes (SPSA)",
     "num_perturbations epsilon antithetic distribution seed scope combine prior_power "
     "layers_per_pass"),
    ("ppl", "ppl", (), "block attn mlp",
     "calibration PPL with the unit removed alone (higher = more important)",
     "objective top_k"),
    ("reap", "experts", (), "experts",
     "REAP: mean over routed tokens of gate weight x expert output norm",
     ""),
    ("submodel", "submodel", ("forward",), "heads channels",
     "re-fit error tr(W_c[(A⁻¹)_cc]⁻¹W_cᵀ) × per-layer loss scale from sub-models",
     "fraction damping intercept windows streams calibrate loss centre"),
    ("taylor", "taylor", (), "block attn mlp heads channels",
     "Σ|W ⊙ ∂L/∂W| over the unit's parameters, gradients summed over calibration batches",
     "order aggregation"),
)  # fmt: skip
for _name, _module, _aliases, _units, _summary, _options in TABLE:
    CRITERIA.declare(
        _name,
        f"secateurs.criteria.{_module}",
        aliases=_aliases,
        units=frozenset(_units.split()),
        summary=_summary,
        accepts=tuple(_options.split()),
    )

__all__ = ["CRITERIA", "TABLE", "Criterion", "ScoringContext"]


def __getattr__(name: str) -> Any:
    """``Criterion`` and ``ScoringContext`` from ``criteria.base``, imported on first use."""
    if name in ("Criterion", "ScoringContext"):
        return getattr(import_module("secateurs.criteria.base"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
