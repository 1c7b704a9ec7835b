"""The checks a spec gets against a model's config, before any weight is read.

``PruneSpec`` validated its options against each other; here they meet the model: its number
of layers (protected layers, ``--layers``, counts to remove, explicit plans), what its
architecture's adapter can prune (width kinds, experts, routing observable), all from
``config.json``, so a bad choice costs milliseconds instead of a model load.
"""

from __future__ import annotations

from typing import Any

from secateurs.adapters import adapter_for
from secateurs.criteria import CRITERIA
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.plan import resolve_protected
from secateurs.spec import DEPTH_KINDS, PruneSpec, scores_file_for
from secateurs.units.experts import expert_layout


def check_config(spec: PruneSpec, config: Any, budget: bool = True) -> None:
    """Refuse what ``config`` alone shows ``spec`` cannot do (``budget``: also whether its
    budget can be met; not when the run only scores)."""
    adapter = adapter_for(config)
    n = int(config.num_hidden_layers)
    keep = resolve_protected(spec.criterion.protected, n)
    if spec.selection.explicit:
        spec.selection.plan_for(n)  # indices out of range, a plan for another model
        return
    if spec.selection.scores is not None:
        scores_file_for(spec, n)  # missing, not JSON, other keys, another criterion or model
    for kind in spec.width_kinds:
        adapter.width_layout(kind, config)  # no width support here → its refusal
    if spec.width_kinds:
        spec.allocation.layer_range(n)
    if spec.experts:
        _check_experts(spec, adapter, config)
    counted = budget and spec.budget.remove is not None
    if counted and len(spec.units) == 1 and spec.units[0] in DEPTH_KINDS:
        _check_count(spec.units[0], spec.budget.remove, n, keep)
    if spec.budget.latency is not None:
        from secateurs.latency.budget import check_config as check_engine

        check_engine(config, spec.budget.engine)


def _check_count(kind: str, count: int, n: int, keep: tuple[int, ...]) -> None:
    removable = n - len(keep)
    if kind == "block":
        removable = min(removable, n - 1)  # one block must remain
    if count > removable:
        raise ConfigError(
            f"Asked to remove {count} {kind} units but only {removable} of {n} are removable "
            f"(protected: {list(keep)}; at least one block must remain)."
        )


def _check_experts(spec: PruneSpec, adapter: Any, config: Any) -> None:
    layout = expert_layout(adapter, config)  # a dense model → its refusal
    scorer = CRITERIA.get(spec.criterion.name)
    if scorer.needs_calibration and not layout.observable:
        raise UnsupportedModelError(
            f"{config.model_type}: its experts are not called with the routing "
            f"(hidden, top-k ids, weights), so {spec.criterion.name!r} cannot observe them; "
            "use --criterion magnitude."
        )
