"""Per-layer latency costs: the variants, the additive model, its least-squares fit, the table.

A model's time per token on an engine is modelled as

    t(model) = base + Σ_layers [ attn(g_l) + mlp(c_l) + stub · (g_l > 0 and c_l = 0) ]

where ``g_l`` is the layer's KV head groups (0: attention removed) and ``c_l`` its MLP channels
(0: MLP removed). ``base`` is everything outside the decoder layers (embedding lookup, final
norm, output head, per-token overhead); ``stub`` is what a layer that keeps attention but lost
its MLP still costs in the served file (the GGUF export gives it a zero FFN of width 1). A
removed block costs 0. Each term is one column of a least-squares fit over measured models
(``fit_costs``), as Puzzle (arXiv 2411.19146) and EvoPress build their per-layer tables.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from secateurs.errors import ConfigError

if TYPE_CHECKING:
    from secateurs.export.layout import Layout
    from secateurs.plan import Plan

BASE = "base"
STUB = "mlp:stub"
METRICS = ("decode", "prompt")  # seconds per generated token (batch 1), per prompt token
# 2: the base is separated by the dense model without its second half (1: all but one layer
# removed, whose weights fit in the CPU cache and ran faster per layer)
METHOD = 2


@dataclass(frozen=True)
class ModelShape:
    """What a LLaMA-style model's speed depends on (its weights' values do not matter)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{self.num_heads} query heads do not split into {self.num_kv_heads} KV groups."
            )
        if min(self.num_layers, self.hidden_size, self.head_dim, self.intermediate_size) < 1:
            raise ConfigError(f"Model shape has a non-positive size: {self}.")

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a transformers config (object or dict)."""
        c = config if isinstance(config, Mapping) else config.to_dict()
        heads = int(c["num_attention_heads"])
        return cls(
            num_layers=int(c["num_hidden_layers"]),
            hidden_size=int(c["hidden_size"]),
            num_heads=heads,
            num_kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            intermediate_size=int(c["intermediate_size"]),
            vocab_size=int(c["vocab_size"]),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            model_type=str(c.get("model_type", "llama")),
        )


@dataclass(frozen=True, order=True)
class LayerVariant:
    """One layer's form: KV head groups kept (query heads per group fixed) and MLP channels.

    ``(G, I)`` keeps the layer; ``(0, I)`` drops its attention; ``(G, 0)`` its MLP; ``(0, 0)``
    the whole block."""

    kv_groups: int
    channels: int

    def __post_init__(self) -> None:
        if self.kv_groups < 0 or self.channels < 0:
            raise ConfigError(f"A layer variant cannot have negative sizes: {self}.")

    @property
    def removed(self) -> bool:
        return self.kv_groups == 0 and self.channels == 0

    def label(self, shape: ModelShape) -> str:
        if self.removed:
            return "drop block"
        attn = "no attn" if self.kv_groups == 0 else f"KV {self.kv_groups}/{shape.num_kv_heads}"
        mlp = "no MLP" if self.channels == 0 else f"MLP {self.channels}/{shape.intermediate_size}"
        return f"{attn}, {mlp}"


def keep(shape: ModelShape) -> LayerVariant:
    return LayerVariant(shape.num_kv_heads, shape.intermediate_size)


def mlp_levels(shape: ModelShape, steps: int = 8) -> tuple[int, ...]:
    """MLP widths k/steps of the full width, k = 1..steps (each must be a whole channel count)."""
    if shape.intermediate_size % steps:
        raise ConfigError(
            f"MLP width {shape.intermediate_size} is not divisible into {steps} levels."
        )
    return tuple(shape.intermediate_size * k // steps for k in range(1, steps + 1))


def layer_variants(
    shape: ModelShape, channels: Sequence[int] | None = None
) -> tuple[LayerVariant, ...]:
    """Every per-layer form: attention with 0..G KV groups × MLP at 0 or each width level.

    Includes keep, drop attention, drop MLP, drop block, each MLP level and each KV level, and
    their combinations (which the additive model prices from the same terms)."""
    widths = sorted({0, *(channels or mlp_levels(shape)), shape.intermediate_size})
    bad = [c for c in widths if c > shape.intermediate_size]
    if bad:
        raise ConfigError(f"MLP widths {bad} exceed the model's {shape.intermediate_size}.")
    groups = range(shape.num_kv_heads + 1)
    return tuple(LayerVariant(g, c) for g in groups for c in widths)


def terms(variant: LayerVariant) -> tuple[str, ...]:
    """The cost terms one layer in ``variant`` adds (none for a removed block)."""
    out = []
    if variant.kv_groups:
        out.append(f"attn:{variant.kv_groups}")
    if variant.channels:
        out.append(f"mlp:{variant.channels}")
    elif variant.kv_groups:
        out.append(STUB)
    return tuple(out)


def term_counts(layers: Iterable[LayerVariant]) -> Counter[str]:
    """How often each term occurs in a model with these layers, ``base`` included once."""
    counts: Counter[str] = Counter({BASE: 1})
    for variant in layers:
        counts.update(terms(variant))
    return counts


def fit_costs(
    models: Sequence[Mapping[str, int]], seconds: Sequence[float]
) -> tuple[dict[str, float], list[float]]:
    """Least-squares per-term costs from measured models: (costs, residuals in seconds).

    ``models`` are term counts (``term_counts``); every term must be identifiable, i.e. the
    design matrix must have full column rank, else the costs would be arbitrary."""
    names = sorted({t for m in models for t in m})
    matrix = np.array([[m.get(t, 0) for t in names] for m in models], dtype=np.float64)
    target = np.asarray(seconds, dtype=np.float64)
    rank = np.linalg.matrix_rank(matrix)
    if rank < len(names):
        raise ConfigError(
            f"The measured models determine only {rank} of {len(names)} cost terms "
            f"({', '.join(names)}); add models that separate them."
        )
    solution, *_ = np.linalg.lstsq(matrix, target, rcond=None)
    residuals = (target - matrix @ solution).tolist()
    return dict(zip(names, solution.tolist(), strict=True)), residuals


@dataclass(frozen=True)
class TableKey:
    """What a table was measured for; a table is reused only for an identical key."""

    shape: ModelShape
    engine: str
    engine_version: str
    dtype: str
    threads: int
    machine: str
    n_prompt: int
    n_gen: int
    clock: str = "cpu"  # what a sample's time is: process CPU time or wall time
    statistic: str = "min"  # what summarises the samples
    method: int = METHOD  # how the models to measure are chosen (a new design re-measures)

    def digest(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TableKey:
        """A stored key; one written before a field existed gets the value it was measured
        with then (not today's default), so an old table is never mistaken for a new one."""
        return cls(**{**LEGACY, **data, "shape": ModelShape(**data["shape"])})


# what a stored key lacking a field was measured with: wall time (before ``clock``), the median
# (before ``statistic``), the first design (before ``method``)
LEGACY = {"clock": "wall", "statistic": "median", "method": 1}


@dataclass(frozen=True)
class LatencyTable:
    """Per-term seconds per token (``costs[metric][term]``), with the measurements behind them.

    ``design``: each measured model as ``{"layers": [[g, c], ...], "decode": s, "prompt": s}``;
    ``residuals[metric]``: the fit's error on each of them (seconds)."""

    key: TableKey
    costs: dict[str, dict[str, float]]
    design: list[dict[str, Any]] = field(default_factory=list)
    residuals: dict[str, list[float]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # load average, duration, settings

    def __post_init__(self) -> None:
        missing = [m for m in METRICS if m not in self.costs]
        if missing:
            raise ConfigError(f"Latency table lacks the metric(s) {missing}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
        return cls(**{**data, "key": TableKey.from_dict(data["key"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatencyTable:
        return cls.from_dict(json.loads(text))

    def cost(self, variant: LayerVariant, metric: str = "decode") -> float:
        """Seconds per token one layer in ``variant`` adds."""
        return sum(self._term(t, metric) for t in terms(variant))

    def _term(self, term: str, metric: str) -> float:
        costs = self.costs[metric]
        if term in costs:
            return costs[term]
        if term.startswith("mlp:"):
            return _interpolate_mlp(costs, int(term[4:]))
        raise ConfigError(
            f"The latency table has no cost for {term!r} (measured: {', '.join(sorted(costs))})."
        )


def _interpolate_mlp(costs: Mapping[str, float], channels: int) -> float:
    """An MLP width between measured levels: linear in the channels (as its FLOPs and bytes
    are); below the narrowest level, the first segment's line."""
    points = sorted((int(t[4:]), c) for t, c in costs.items() if t.startswith("mlp:") and t != STUB)
    if len(points) < 2 or channels > points[-1][0]:
        raise ConfigError(f"MLP width {channels} is outside the measured levels {points}.")
    xs, ys = zip(*points, strict=True)
    if channels >= xs[0]:
        return float(np.interp(channels, xs, ys))
    slope = (ys[1] - ys[0]) / (xs[1] - xs[0])
    return ys[0] + slope * (channels - xs[0])


def predict(table: LatencyTable, layers: Sequence[LayerVariant], metric: str = "decode") -> float:
    """Predicted seconds per token of a model whose layers take these forms."""
    if metric not in METRICS:
        raise ConfigError(f"Unknown latency metric {metric!r}; known: {', '.join(METRICS)}.")
    if len(layers) != table.key.shape.num_layers:
        raise ConfigError(
            f"{len(layers)} layer variants given; the table's model has "
            f"{table.key.shape.num_layers} layers."
        )
    return table.costs[metric][BASE] + sum(table.cost(v, metric) for v in layers)


def plan_layers(plan: Plan, shape: ModelShape) -> tuple[LayerVariant, ...]:
    """Each layer's form after ``plan`` (a ``secateurs.plan.Plan`` over this shape's layers)."""
    if plan.num_layers != shape.num_layers:
        raise ConfigError(
            f"Plan is for {plan.num_layers} layers; the shape has {shape.num_layers}."
        )
    layers = []
    for i in range(shape.num_layers):
        groups = shape.num_kv_heads - (len(plan.heads[i]) if plan.heads else 0)
        channels = shape.intermediate_size - (len(plan.channels[i]) if plan.channels else 0)
        if i in plan.blocks:
            groups, channels = 0, 0
        layers.append(
            LayerVariant(0 if i in plan.attn else groups, 0 if i in plan.mlp else channels)
        )
    return tuple(layers)


def layout_layers(layout: Layout, shape: ModelShape) -> tuple[LayerVariant, ...]:
    """Each layer's form in a pruned checkpoint (``secateurs.export.layout.read_layout``); the
    blocks it no longer has count as removed (they cost nothing wherever they were)."""
    missing = shape.num_layers - len(layout.layers)
    if missing < 0:
        raise ConfigError(
            f"The checkpoint has {len(layout.layers)} layers; the shape {shape.num_layers}."
        )
    layers = []
    for i, s in enumerate(layout.layers):
        if s.heads != s.kv_heads * shape.heads_per_group:
            raise ConfigError(
                f"Layer {i} has {s.heads} query heads over {s.kv_heads} KV heads; latency tables "
                f"price whole KV groups of {shape.heads_per_group} query heads."
            )
        layers.append(LayerVariant(s.kv_heads, s.channels))
    return (*layers, *(LayerVariant(0, 0),) * missing)


def tokens_per_second(seconds_per_token: float) -> float:
    return 1.0 / seconds_per_token if seconds_per_token > 0 else math.inf
