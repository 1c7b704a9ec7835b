"""What to remove: a frozen, JSON-serialisable plan, validated on creation, and its selection.

Shortened LLaMA's "+" heuristic protects blocks {0, 1, 2, 3, L-2, L-1}; the protected set is a
parameter (negative indices count from the end) so other policies are one argument away.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from secateurs.errors import ConfigError, ScoreError
from secateurs.units import DEPTH_UNITS, Unit, check_unit_kind

SL_PROTECTED = (0, 1, 2, 3, -2, -1)


def resolve_protected(protected: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Absolute, sorted layer indices of ``protected`` (negatives count from the end)."""
    resolved = set()
    for index in protected:
        absolute = index + num_layers if index < 0 else index
        if not 0 <= absolute < num_layers:
            raise ConfigError(f"Protected layer {index} is out of range for {num_layers} layers.")
        resolved.add(absolute)
    return tuple(sorted(resolved))


def parse_protected(text: str | Sequence[int] | None) -> tuple[int, ...]:
    """Parse ``--protect``: "sl" (Shortened LLaMA's set), "none", or "0,1,-1"."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "none"):
        return ()
    if isinstance(text, str):
        if text.strip().lower() == "sl":
            return SL_PROTECTED
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise ConfigError(
                f"--protect takes 'sl', 'none' or indices like '0,1,-1', not {text!r}."
            ) from err
    return tuple(int(i) for i in text)


@dataclass(frozen=True)
class Plan:
    """Depth units to remove from a model of ``num_layers`` decoder layers.

    ``blocks`` are whole layers; ``attn``/``mlp`` are layers whose attention / MLP branch goes.
    Indices refer to the original model's layers.
    """

    num_layers: int
    blocks: tuple[int, ...] = ()
    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    protected: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("blocks", "attn", "mlp", "protected"):
            values = tuple(sorted({int(i) for i in getattr(self, name)}))
            bad = [i for i in values if not 0 <= i < self.num_layers]
            if bad:
                raise ConfigError(f"Plan {name} {bad} out of range for {self.num_layers} layers.")
            object.__setattr__(self, name, values)
        if len(self.blocks) >= self.num_layers:
            raise ConfigError(
                f"Plan removes all {self.num_layers} blocks; at least one must remain."
            )
        hit = sorted(set(self.protected) & set(self.blocks + self.attn + self.mlp))
        if hit:
            raise ConfigError(
                f"Plan removes protected layers {hit} (protected: {list(self.protected)})."
            )
        overlap = sorted(set(self.blocks) & set(self.attn + self.mlp))
        if overlap:
            raise ConfigError(f"Layers {overlap} are removed whole and by branch; pick one.")

    @property
    def units(self) -> tuple[Unit, ...]:
        return tuple(
            Unit(layer, kind) for kind in DEPTH_UNITS for layer in getattr(self, _field(kind))
        )

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.blocks)

    @property
    def is_empty(self) -> bool:
        return not (self.blocks or self.attn or self.mlp)

    def to_dict(self) -> dict[str, Any]:
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in asdict(self).items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})

    @classmethod
    def of_units(
        cls, num_layers: int, units: Iterable[Unit], protected: Iterable[int] = ()
    ) -> Plan:
        by_kind: dict[str, list[int]] = {kind: [] for kind in DEPTH_UNITS}
        for layer, kind in units:
            by_kind[check_unit_kind(kind)].append(layer)
        fields = {_field(kind): tuple(layers) for kind, layers in by_kind.items()}
        return cls(num_layers=num_layers, protected=tuple(protected), **fields)


def _field(kind: str) -> str:
    return "blocks" if kind == "block" else kind


def count_to_remove(num_units: int, *, ratio: float | None, remove: int | None) -> int:
    """How many units ``--ratio`` (fraction of the units) or ``--remove`` asks for."""
    if (ratio is None) == (remove is None):
        raise ConfigError("Give exactly one of ratio (fraction of units) or remove (a count).")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise ConfigError(f"Ratio must be in (0, 1); got {ratio}.")
        count = round(ratio * num_units)
        if count == 0:
            raise ConfigError(f"Ratio {ratio} of {num_units} units removes nothing; raise it.")
        return count
    if remove is None or remove <= 0:
        raise ConfigError(f"remove must be a positive count; got {remove}.")
    return remove


def check_scores(values: torch.Tensor, criterion: str) -> None:
    if not torch.isfinite(values).all():
        bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
        raise ScoreError(
            f"Criterion {criterion!r} produced non-finite scores at units {bad}: "
            f"{values.tolist()}. Check the calibration data and the model's dtype."
        )


def lowest_unprotected(values: torch.Tensor, count: int, excluded: Iterable[int]) -> list[int]:
    """Indices of the ``count`` lowest scores, skipping ``excluded`` (ties: lower index first)."""
    skip = set(excluded)
    candidates = [i for i in range(len(values)) if i not in skip]
    if count > len(candidates):
        raise ConfigError(
            f"Asked to remove {count} units but only {len(candidates)} of {len(values)} are "
            f"removable (protected or already removed: {sorted(skip)})."
        )
    order = sorted(candidates, key=lambda i: (float(values[i]), i))
    return sorted(order[:count])


@dataclass(frozen=True)
class WidthPlan:
    """Width units to remove, per layer: head groups (``heads``) and MLP ``channels``.

    ``num_heads[l]`` / ``num_channels[l]`` are the layer's unit counts before pruning (0 where
    the kind is not pruned). Indices refer to the original units. ``compensate``: FLAP bias
    compensation of the removed units' mean contribution.
    """

    num_layers: int
    heads: tuple[tuple[int, ...], ...]
    channels: tuple[tuple[int, ...], ...]
    num_heads: tuple[int, ...]
    num_channels: tuple[int, ...]
    compensate: bool = False

    def __post_init__(self) -> None:
        for name in ("heads", "channels"):
            per_layer = tuple(
                tuple(sorted({int(i) for i in units})) for units in getattr(self, name)
            )
            object.__setattr__(self, name, per_layer)
            counts = getattr(self, f"num_{name}")
            object.__setattr__(self, f"num_{name}", tuple(int(c) for c in counts))
            if len(per_layer) != self.num_layers or len(counts) != self.num_layers:
                raise ConfigError(f"WidthPlan {name} must list all {self.num_layers} layers.")
            for layer, (units, count) in enumerate(zip(per_layer, counts, strict=True)):
                self._check_layer(name, layer, units, count)

    @staticmethod
    def _check_layer(name: str, layer: int, units: tuple[int, ...], count: int) -> None:
        bad = [i for i in units if not 0 <= i < count]
        if bad:
            raise ConfigError(f"WidthPlan layer {layer}: {name} {bad} out of range ({count}).")
        if units and len(units) >= count:
            raise ConfigError(
                f"WidthPlan layer {layer}: removing all {count} {name} would empty the layer; "
                "keep at least one (lower the ratio or the per-layer maximum)."
            )

    def removed(self, kind: str) -> tuple[tuple[int, ...], ...]:
        return self.heads if kind == "heads" else self.channels

    def kept(self, kind: str) -> tuple[int, ...]:
        """Units kept per layer."""
        counts = self.num_heads if kind == "heads" else self.num_channels
        return tuple(c - len(r) for c, r in zip(counts, self.removed(kind), strict=True))

    @property
    def is_empty(self) -> bool:
        return not any(self.heads) and not any(self.channels)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("heads", "channels"):
            data[key] = [list(units) for units in data[key]]
        for key in ("num_heads", "num_channels"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WidthPlan:
        data = dict(data)
        for key in ("heads", "channels"):
            data[key] = tuple(tuple(units) for units in data[key])
        return cls(**data)
