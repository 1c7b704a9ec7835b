"""Scores + per-unit costs + a budget → which units go. Model-free: tensors and counts in,
indices out, for every unit kind.

- Depth (one kind): the ``count`` lowest-scoring units outside the protected layers.
- Experts: per MoE layer the lowest-scoring experts, the same count in every layer
  (``uniform``) or ranked together after dividing each layer's scores by their mean
  (``global``), keeping at least top-k (and ``min_keep``) per layer.
- Width (below): how many head groups / channels each layer loses, for a target number of
  parameters.

``uniform``: the same fraction of each unit kind in every pruned layer (heads rounded to whole
KV groups per layer, channels to ``round_to``), the fraction chosen so that the parameters
removed are closest to the target. ``global``: every unit of every pruned layer ranked together,
removed lowest first until the target is met — ranked by predicted loss change per parameter
where the criterion's scores are predicted loss changes (``influence``: comparable across
layers and kinds as they are), else after per-layer, per-kind standardisation (FLAP), or sized
by measured per-layer sensitivity (``secateurs.sensitivity``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from secateurs.errors import ConfigError

log = logging.getLogger(__name__)

ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class Bounds:
    """Per-layer limits: fraction of a layer's units that may go, and channel rounding."""

    min_ratio: float = 0.0
    max_ratio: float = 0.9
    round_to: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.min_ratio <= self.max_ratio < 1:
            raise ConfigError(
                f"Per-layer bounds need 0 <= min_ratio <= max_ratio < 1 (a layer must keep "
                f"something); got min {self.min_ratio}, max {self.max_ratio}."
            )
        if self.round_to < 1:
            raise ConfigError(f"round_to must be a positive multiple; got {self.round_to}.")

    def limits(self, count: int, kind: str) -> tuple[int, int]:
        """(least, most) units of a layer of ``count`` that may be removed."""
        step = self.round_to if kind == "channels" else 1
        most = min(math.floor(self.max_ratio * count), count - step)
        least = min(math.ceil(self.min_ratio * count), most)
        return least, max(most, 0)


@dataclass(frozen=True)
class UnitTable:
    """Scores and per-unit parameter cost of one kind, for every layer (empty if not pruned)."""

    kind: str
    scores: tuple[torch.Tensor, ...]
    costs: tuple[int, ...]

    def count(self, layer: int) -> int:
        return len(self.scores[layer])


def allocate(
    tables: Sequence[UnitTable],
    target: int,
    layers: Sequence[int],
    mode: str,
    bounds: Bounds,
    uniform_widths: bool | tuple[str, ...] = False,
    sensitivity: dict[str, Sequence[float]] | None = None,
    loss_scores: bool = False,
) -> dict[str, list[tuple[int, ...]]]:
    """Removed unit indices per kind and layer, aiming at ``target`` parameters removed.

    ``global`` with ``sensitivity`` (per kind and layer, see ``secateurs.sensitivity``) sizes
    each layer by it; without, it ranks all units together: by score per parameter if the
    scores are predicted loss changes (``loss_scores``), else after per-layer standardisation.
    ``uniform_widths`` (global only): True, or the unit kinds, to spread evenly over layers.
    """
    if mode not in ALLOCATIONS:
        raise ConfigError(f"Unknown allocation {mode!r}; expected one of {ALLOCATIONS}.")
    if mode == "uniform":
        counts = _uniform_counts(tables, target, layers, bounds)
    else:
        if sensitivity is not None:
            counts = sensitivity_counts(tables, target, layers, bounds, sensitivity)
        else:
            counts = _global_counts(tables, target, layers, bounds, loss_scores)
        if uniform_widths:
            kinds = {t.kind for t in tables} if uniform_widths is True else set(uniform_widths)
            counts = _even_out(tables, counts, layers, bounds, kinds)
            counts.update(_rebalance(tables, counts, target, layers, bounds, kinds, loss_scores))
    return {t.kind: _lowest(t, counts[t.kind]) for t in tables}


def _lowest(table: UnitTable, counts: list[int]) -> list[tuple[int, ...]]:
    chosen = []
    for layer, n in enumerate(counts):
        values = table.scores[layer]
        order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
        chosen.append(tuple(sorted(order[:n])))
    return chosen


def _uniform_count(count: int, fraction: float, kind: str, bounds: Bounds) -> int:
    least, most = bounds.limits(count, kind)
    if kind == "channels":
        kept = round((count - fraction * count) / bounds.round_to) * bounds.round_to
        n = count - max(kept, bounds.round_to)
    else:
        n = round(fraction * count)  # whole KV groups
    return min(max(n, least), most)


def _uniform_counts(tables, target, layers, bounds) -> dict[str, list[int]]:
    def counts_at(f: float) -> dict[str, list[int]]:
        return {
            t.kind: [
                _uniform_count(t.count(i), f, t.kind, bounds) if i in layers else 0
                for i in range(len(t.scores))
            ]
            for t in tables
        }

    best = min((abs(_removed(tables, counts_at(s / 2000)) - target), s) for s in range(2000))
    counts = counts_at(best[1] / 2000)
    for t in tables:
        _log_rounding(t, counts[t.kind], best[1] / 2000, layers)
    return counts


def _log_rounding(table: UnitTable, counts: list[int], fraction: float, layers) -> None:
    if table.kind != "heads" or not layers:
        return
    total = table.count(layers[0])
    n = counts[layers[0]]
    if not math.isclose(n, fraction * total, abs_tol=1e-9):
        log.info(
            "uniform fraction %.3f of %d KV groups per layer rounded to whole groups: "
            "%d removed per layer",
            fraction,
            total,
            n,
        )


def _removed(tables: Sequence[UnitTable], counts: dict[str, list[int]]) -> int:
    return sum(n * t.costs[i] for t in tables for i, n in enumerate(counts[t.kind]))


def standardised(values: torch.Tensor) -> torch.Tensor:
    """(s − mean) / std within one layer and kind (FLAP); a constant layer gives zeros."""
    values = values.to(torch.float64)
    std = values.std() if len(values) > 1 else torch.tensor(0.0, dtype=torch.float64)
    if not torch.isfinite(std) or std == 0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def per_parameter(values: torch.Tensor, cost: int) -> torch.Tensor:
    """Predicted loss change per parameter removed: the knapsack order of a global budget."""
    return values.to(torch.float64) / max(cost, 1)


def _global_counts(tables, target, layers, bounds, loss_scores=False) -> dict[str, list[int]]:
    counts = {t.kind: [0] * len(t.scores) for t in tables}
    candidates = []
    for t in tables:
        for layer in layers:
            least, _ = bounds.limits(t.count(layer), t.kind)
            counts[t.kind][layer] = least  # the per-layer minimum goes first
            values = t.scores[layer]
            z = per_parameter(values, t.costs[layer]) if loss_scores else standardised(values)
            ranked = sorted(range(len(z)), key=lambda i: (float(t.scores[layer][i]), i))
            candidates += [(float(z[i]), t.kind, layer) for i in ranked[least:]]
    removed = _removed(tables, counts)
    costs = {t.kind: t.costs for t in tables}
    limits = {(t.kind, i): bounds.limits(t.count(i), t.kind)[1] for t in tables for i in layers}
    for _, kind, layer in sorted(candidates, key=lambda c: c[0]):
        cost = costs[kind][layer]
        if removed + cost / 2 > target:
            continue  # would overshoot by more than it gains; a cheaper unit may still fit
        if counts[kind][layer] < limits[(kind, layer)]:
            counts[kind][layer] += 1
            removed += cost
    return _round_channels(tables, counts, layers, bounds)


def _round_channels(tables, counts, layers, bounds) -> dict[str, list[int]]:
    if bounds.round_to == 1 or "channels" not in counts:
        return counts
    table = next(t for t in tables if t.kind == "channels")
    for layer in layers:
        total = table.count(layer)
        kept = total - counts["channels"][layer]
        kept = max(round(kept / bounds.round_to) * bounds.round_to, bounds.round_to)
        least, most = bounds.limits(total, "channels")
        counts["channels"][layer] = min(max(total - kept, least), most)
    return counts


def _rebalance(
    tables, counts, target, layers, bounds, kinds, loss_scores=False
) -> dict[str, list[int]]:
    """Kinds left free re-allocated globally for what the evened-out kinds did not remove."""
    free = [t for t in tables if t.kind not in kinds]
    if not free:
        return {}
    fixed = _removed([t for t in tables if t.kind in kinds], counts)
    return _global_counts(free, target - fixed, layers, bounds, loss_scores)


def _even_out(tables, counts, layers, bounds, kinds=None) -> dict[str, list[int]]:
    """Spread each kind's global total evenly over the pruned layers (one width for all)."""
    even = dict(counts)
    for t in tables:
        if kinds is not None and t.kind not in kinds:
            continue
        mean = sum(counts[t.kind][i] for i in layers) / max(len(layers), 1)
        fraction = mean / t.count(layers[0]) if layers else 0.0
        even[t.kind] = [
            _uniform_count(t.count(i), fraction, t.kind, bounds) if i in layers else 0
            for i in range(len(t.scores))
        ]
    log.info("--uniform-widths: global totals spread evenly over %d layers", len(layers))
    return even


def sensitivity_counts(
    tables: Sequence[UnitTable],
    target: int,
    layers: Sequence[int],
    bounds: Bounds,
    sensitivity: dict[str, Sequence[float]],
) -> dict[str, list[int]]:
    """Units removed per kind and layer with fractions r ∝ cost / sensitivity (see
    ``secateurs.sensitivity``), scaled so the parameters removed are closest to ``target``."""
    floor = _sensitivity_floor(sensitivity, layers)
    weight = {
        t.kind: [
            t.costs[i] * t.count(i) / max(sensitivity[t.kind][i], floor) if i in layers else 0.0
            for i in range(len(t.scores))
        ]
        for t in tables
    }
    top = max((w for ws in weight.values() for w in ws), default=0.0) or 1.0

    def counts_at(scale: float) -> dict[str, list[int]]:
        return {
            t.kind: [
                _uniform_count(
                    t.count(i), min(scale * weight[t.kind][i] / top, 1.0), t.kind, bounds
                )
                if i in layers
                else 0
                for i in range(len(t.scores))
            ]
            for t in tables
        }

    low, high = 0.0, 1.0
    while _removed(tables, counts_at(high)) < target and high < 1e6:
        high *= 2
    for _ in range(60):  # bisection on the common scale
        mid = (low + high) / 2
        low, high = (mid, high) if _removed(tables, counts_at(mid)) < target else (low, mid)
    below, above = counts_at(low), counts_at(high)
    closer = abs(_removed(tables, below) - target) <= abs(_removed(tables, above) - target)
    return below if closer else above


def _sensitivity_floor(sensitivity: dict[str, Sequence[float]], layers: Sequence[int]) -> float:
    """A layer whose loss did not rise is not free: floor at 1% of the median sensitivity."""
    values = sorted(s[i] for s in sensitivity.values() for i in layers if s[i] > 0)
    return 0.01 * values[len(values) // 2] if values else 1.0


# --- budgets ------------------------------------------------------------------------------------
def unit_count(target: float, costs: Sequence[int], what: str) -> int:
    """How many units of average cost ``costs`` make ``target`` parameters (at least one)."""
    mean = sum(costs) / len(costs)
    count = round(target / mean)
    if count < 1:
        raise ConfigError(
            f"The budget ({target:,.0f} parameters) is less than half of one {what} "
            f"({mean:,.0f}); raise it."
        )
    return count


# --- experts ------------------------------------------------------------------------------------
def allocate_experts(
    scores: Sequence[torch.Tensor], per_layer: int | None, total: int | None, floor: int
) -> list[tuple[int, ...]]:
    """Experts to remove per MoE layer: ``per_layer`` in every layer (uniform), or ``total``
    ranked globally (lowest first; ties: lower index first); each layer keeps ``floor``."""
    if per_layer is not None:
        return _uniform_experts(scores, per_layer, floor)
    return _global_experts(scores, int(total), floor)


def _lowest_experts(values: torch.Tensor, count: int) -> tuple[int, ...]:
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    return tuple(sorted(order[:count]))


def _uniform_experts(scores, n: int, floor: int) -> list[tuple[int, ...]]:
    for values in scores:
        if len(values) - n < floor:
            raise ConfigError(
                f"Removing {n} of {len(values)} experts per layer leaves {len(values) - n}; the "
                f"router needs at least {floor} (top-k / --min-keep). Lower the amount."
            )
    return [_lowest_experts(values, n) for values in scores]


def _global_experts(scores, total: int, floor: int) -> list[tuple[int, ...]]:
    room = [len(v) - floor for v in scores]
    if total <= 0 or total > sum(max(r, 0) for r in room):
        raise ConfigError(
            f"Cannot remove {total} experts while keeping {floor} per layer "
            f"(at most {sum(max(r, 0) for r in room)} are removable)."
        )
    ranked = []
    for layer, values in enumerate(scores):
        mean = values.abs().mean()
        norm = values / mean if mean > 0 else torch.zeros_like(values)
        ranked += [(float(norm[e]), layer, e) for e in range(len(values))]
    removed: list[list[int]] = [[] for _ in scores]
    for _, layer, expert in sorted(ranked):
        if sum(map(len, removed)) == total:
            break
        if len(removed[layer]) < room[layer]:
            removed[layer].append(expert)
    return [tuple(sorted(r)) for r in removed]
