"""What to remove: ONE frozen, JSON-serialisable plan for every unit kind (blocks, branches,
per-layer widths, experts), validated on creation, and the helpers that select units.

Shortened LLaMA's "+" heuristic protects blocks {0, 1, 2, 3, L-2, L-1}; the protected set is a
parameter (negative indices count from the end) so other policies are one argument away.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from secateurs.errors import ConfigError, ScoreError

if TYPE_CHECKING:  # the spec reads plans; torch is imported only where scores are checked
    import torch

DEPTH_UNITS = ("block", "attn", "mlp")


class Unit(NamedTuple):
    """One depth unit: ``kind`` ("block", "attn" or "mlp") of decoder layer ``layer``."""

    layer: int
    kind: str


def check_unit_kind(kind: str) -> str:
    if kind not in DEPTH_UNITS:
        raise ConfigError(f"Unknown depth unit {kind!r}; expected one of {', '.join(DEPTH_UNITS)}.")
    return kind


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


Layers = tuple[tuple[int, ...], ...]

# The keys of each part of a plan, as ``Plan.to_dict`` writes them.
PARTS: dict[str, tuple[str, ...]] = {
    "depth": ("blocks", "attn", "mlp", "protected"),
    "width": ("heads", "channels", "num_heads", "num_channels", "compensate"),
    "experts": ("experts", "num_experts", "top_k"),
}
WIDTH_PAIRS = (("heads", "num_heads"), ("channels", "num_channels"))
EXPERT_PAIRS = (("experts", "num_experts"),)
# Where a secateurs.json record keeps its plan: ``plan`` (every kind, this version), and the
# width-only / experts-only plans of earlier versions.
RECORD_KEYS = ("plan", "width_plan", "expert_plan")


@dataclass(frozen=True)
class Plan:
    """Every unit to remove from a model of ``num_layers`` decoder layers, of any kind.

    Depth: ``blocks`` are whole layers; ``attn``/``mlp`` layers whose attention / MLP branch goes.
    Width: ``heads[l]`` (KV head groups) and ``channels[l]`` (MLP channels) removed from layer
    ``l``, out of ``num_heads[l]`` / ``num_channels[l]``, the layer's counts before pruning (0
    where the kind is not pruned); ``compensate``: FLAP's bias compensation of what goes.
    Experts: ``experts[l]`` routed experts removed out of ``num_experts[l]`` (0: a dense
    layer); every MoE layer keeps at least ``top_k``. An empty tuple means "no such part".

    Every index refers to the ORIGINAL model, whatever else the plan removes (``surgery.
    apply_plan`` cuts experts and widths before it drops blocks). A layer removed whole takes
    no other cut, nor does a removed branch (heads of a removed attention; channels or experts
    of a removed MLP): such a plan is refused, since it names units that cannot exist.
    ``protected`` layers (Shortened LLaMA's heuristic) are never removed or cut by a branch;
    widths and experts are bounded by their own allocation instead.
    """

    num_layers: int
    blocks: tuple[int, ...] = ()
    attn: tuple[int, ...] = ()
    mlp: tuple[int, ...] = ()
    protected: tuple[int, ...] = field(default=())
    heads: Layers = ()
    channels: Layers = ()
    num_heads: tuple[int, ...] = ()
    num_channels: tuple[int, ...] = ()
    compensate: bool = False
    experts: Layers = ()
    num_experts: tuple[int, ...] = ()
    top_k: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_layers", int(self.num_layers))
        self._check_depth()
        self._normalise(WIDTH_PAIRS)
        self._normalise(EXPERT_PAIRS)
        for name, counts in WIDTH_PAIRS:
            for layer, units in enumerate(getattr(self, name)):
                _check_width_layer(name, layer, units, getattr(self, counts)[layer])
        for layer, gone in enumerate(self.experts):
            self._check_expert_layer(layer, gone, self.num_experts[layer])
        self._check_combination()

    # --- validation ------------------------------------------------------------------------
    def _check_depth(self) -> None:
        for name in PARTS["depth"]:
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

    def _normalise(self, pairs: tuple[tuple[str, str], ...]) -> None:
        """Per-layer parts: all absent (``()``), or every list covering every layer."""
        if not any(getattr(self, name) or getattr(self, counts) for name, counts in pairs):
            return
        n = self.num_layers
        for name, counts in pairs:
            removed = getattr(self, name) or ((),) * n
            totals = getattr(self, counts) or (0,) * n
            if len(removed) != n or len(totals) != n:
                raise ConfigError(f"Plan {name} and {counts} must list all {n} layers.")
            per_layer = tuple(tuple(sorted({int(i) for i in units})) for units in removed)
            object.__setattr__(self, name, per_layer)
            object.__setattr__(self, counts, tuple(int(c) for c in totals))

    def _check_expert_layer(self, layer: int, gone: tuple[int, ...], count: int) -> None:
        if gone and count == 0:
            raise ConfigError(f"Plan layer {layer} has no routed experts; it removes {list(gone)}.")
        bad = [e for e in gone if not 0 <= e < count]
        if bad:
            raise ConfigError(f"Layer {layer}: experts {bad} out of range (it has {count}).")
        left = count - len(gone)
        if gone and left < max(self.top_k, 1):
            raise ConfigError(
                f"Layer {layer}: removing {len(gone)} of {count} experts leaves {left}, but the "
                f"router picks top-{self.top_k} per token; keep at least {max(self.top_k, 1)} "
                "(lower the ratio)."
            )

    def _check_combination(self) -> None:
        """Cuts inside a removed layer or branch name units that cannot exist."""
        rules = (
            ("removed whole", self.blocks, ("heads", "channels", "experts")),
            ("without attention", self.attn, ("heads",)),
            ("without MLP", self.mlp, ("channels", "experts")),
        )
        for what, layers, kinds in rules:
            for kind in kinds:
                per_layer = getattr(self, kind)
                clash = [i for i in layers if per_layer and per_layer[i]]
                if clash:
                    raise ConfigError(
                        f"Plan layers {clash} are {what} and also lose {kind}; a plan may cut "
                        "a layer one way only (indices refer to the original model)."
                    )

    # --- what it removes -------------------------------------------------------------------
    @property
    def units(self) -> tuple[Unit, ...]:
        """The depth units (blocks and branches)."""
        return tuple(
            Unit(layer, kind) for kind in DEPTH_UNITS for layer in getattr(self, _field(kind))
        )

    @property
    def kept_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.blocks)

    @property
    def has_depth(self) -> bool:
        return bool(self.blocks or self.attn or self.mlp)

    @property
    def has_widths(self) -> bool:
        return any(self.heads) or any(self.channels)

    @property
    def has_experts(self) -> bool:
        return any(self.experts)

    @property
    def parts(self) -> tuple[str, ...]:
        """The kinds of cut present: a subset of ("depth", "width", "experts")."""
        present = (self.has_depth, self.has_widths, self.has_experts)
        return tuple(name for name, there in zip(PARTS, present, strict=True) if there)

    @property
    def is_empty(self) -> bool:
        return not self.parts

    def removed(self, kind: str) -> Layers:
        """Per layer, the removed units of ``kind`` ("heads", "channels" or "experts")."""
        per_layer = getattr(self, kind)
        return per_layer or ((),) * self.num_layers

    def kept(self, kind: str) -> tuple[int, ...]:
        """Units of ``kind`` kept per layer."""
        counts = getattr(self, f"num_{kind}") or (0,) * self.num_layers
        return tuple(c - len(r) for c, r in zip(counts, self.removed(kind), strict=True))

    @property
    def expert_layers(self) -> tuple[int, ...]:
        """The layers that route to experts."""
        return tuple(i for i, count in enumerate(self.num_experts) if count)

    def removed_by_layer(self) -> dict[int, tuple[int, ...]]:
        """Experts removed per MoE layer, for the layers that lose some."""
        return {layer: gone for layer, gone in enumerate(self.experts) if gone}

    # --- parts and combinations ------------------------------------------------------------
    def part(self, name: str) -> Plan:
        """This plan restricted to one part ("depth", "width" or "experts")."""
        if name not in PARTS:
            raise ConfigError(f"Unknown plan part {name!r}; expected one of {list(PARTS)}.")
        return Plan(self.num_layers, **{key: getattr(self, key) for key in PARTS[name]})

    def without(self, name: str) -> Plan:
        """This plan minus one part."""
        keep = [key for part, keys in PARTS.items() if part != name for key in keys]
        return Plan(self.num_layers, **{key: getattr(self, key) for key in keep})

    def merged(self, other: Plan) -> Plan:
        """One plan removing what either removes (the two must cover disjoint parts)."""
        if other.num_layers != self.num_layers:
            raise ConfigError(
                f"Cannot combine plans for {self.num_layers} and {other.num_layers} layers."
            )
        both = sorted(set(self.parts) & set(other.parts))
        if both:
            raise ConfigError(f"Both plans have a {' and '.join(both)} part; cannot combine them.")
        fields = {}
        for name, keys in PARTS.items():
            source = other if name in other.parts else self
            fields.update({key: getattr(source, key) for key in keys})
        fields["protected"] = tuple(set(self.protected) | set(other.protected))
        return Plan(self.num_layers, **fields)

    # --- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """``num_layers`` and the depth lists always; the width and expert keys where the plan
        has such a part (so a depth-only or width-only plan writes what earlier versions did)."""
        data: dict[str, Any] = {"num_layers": self.num_layers}
        keys = list(PARTS["depth"])
        if self.num_heads:
            keys += PARTS["width"]
        if self.num_experts:
            keys += PARTS["experts"]
        for key in keys:
            data[key] = _jsonable(getattr(self, key))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """Read ``to_dict``'s output, and the plan formats of earlier versions: depth-only
        (``plan``), width-only (``width_plan``) and experts-only (``expert_plan``) records."""
        if "layers" in data and "removed" in data:  # an expert_plan record
            return cls(**_expert_fields(data))
        known = {f.name for f in dataclass_fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown plan keys {unknown}; expected some of {sorted(known)}.")
        return cls(**{key: _tuples(value) for key, value in data.items()})

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> Plan | None:
        """The plan of a ``secateurs.json`` record of any version (None: the record has none)."""
        found = [cls.from_dict(record[key]) for key in RECORD_KEYS if record.get(key)]
        plan = found[0] if found else None
        for other in found[1:]:
            plan = plan.merged(other)
        return plan

    @classmethod
    def of_widths(
        cls,
        num_layers: int,
        heads: Layers,
        channels: Layers,
        num_heads: Sequence[int],
        num_channels: Sequence[int],
        compensate: bool = False,
    ) -> Plan:
        """A width-only plan: per layer, the removed head groups and channels of the counts."""
        return cls(
            num_layers,
            heads=heads,
            channels=channels,
            num_heads=tuple(num_heads),
            num_channels=tuple(num_channels),
            compensate=compensate,
        )

    @classmethod
    def of_units(
        cls, num_layers: int, units: Iterable[Unit], protected: Iterable[int] = ()
    ) -> Plan:
        by_kind: dict[str, list[int]] = {kind: [] for kind in DEPTH_UNITS}
        for layer, kind in units:
            by_kind[check_unit_kind(kind)].append(layer)
        fields = {_field(kind): tuple(layers) for kind, layers in by_kind.items()}
        return cls(num_layers=num_layers, protected=tuple(protected), **fields)


def _check_width_layer(name: str, layer: int, units: tuple[int, ...], count: int) -> None:
    bad = [i for i in units if not 0 <= i < count]
    if bad:
        raise ConfigError(f"Plan layer {layer}: {name} {bad} out of range ({count}).")
    if units and len(units) >= count:
        raise ConfigError(
            f"Plan layer {layer}: removing all {count} {name} would empty the layer; "
            "keep at least one (lower the ratio or the per-layer maximum)."
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


def _expert_fields(data: dict[str, Any]) -> dict[str, Any]:
    """An earlier version's ``expert_plan`` (removals listed per MoE layer) as Plan fields."""
    n = int(data["num_layers"])
    counts, removed = [0] * n, [()] * n
    listed = zip(data["layers"], data["num_experts"], data["removed"], strict=True)
    for layer, count, gone in listed:
        counts[int(layer)], removed[int(layer)] = int(count), tuple(gone)
    return dict(
        num_layers=n, experts=tuple(removed), num_experts=tuple(counts), top_k=data["top_k"]
    )


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
    import torch

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


def given_plan(data: dict[str, Any], num_layers: int) -> Plan:
    """A plan from JSON: a ``secateurs.json`` record (any version) or a bare plan, whose
    ``num_layers`` may be left out."""
    if any(key in data for key in RECORD_KEYS):
        chosen = Plan.of_record(data)
    else:
        chosen = Plan.from_dict({"num_layers": num_layers, **data})
    if chosen.num_layers != num_layers:
        raise ConfigError(
            f"The plan is for {chosen.num_layers} layers; the model has {num_layers}."
        )
    return chosen


def read_plan_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot read plan file {path}: {err}") from err
