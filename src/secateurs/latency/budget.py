"""A latency budget for the joint search: ``--unit auto --latency F --engine llama.cpp``.

The search (``secateurs.evolve``) removes ``Goal.amount`` of whatever ``Goal.removed`` counts.
Here that is seconds per token an engine's latency table predicts (``table.predict``): a genome
removes the dense model's predicted time minus its own, and ``--latency 0.7`` asks for
``0.3 ×`` the dense time removed, i.e. a model predicted to take 0.7× the dense model's time
per token (decode, batch 1, by default). A genome the engine cannot serve (llama.cpp: the
first kept layer without attention) removes ``-inf``: the search never proposes it.

The table is measured once per model shape, engine, machine and settings and cached
(``measure.measure_table``); the record keeps its key and provenance beside the predicted
dense and pruned speeds, so the end-to-end check (``check_checkpoint``) can set the measured
speed of the written model beside them.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError, SecateursError
from secateurs.evolve import Genome, Goal, Space
from secateurs.latency.engines import STATISTICS, BenchSettings, Engine, Speed
from secateurs.latency.measure import (
    cache_path,
    cached_table,
    engine_for,
    measure_table,
    table_key,
)
from secateurs.latency.table import (
    METRICS,
    LatencyTable,
    LayerVariant,
    ModelShape,
    TableKey,
    keep,
    layout_layers,
    predict,
)

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "llama.cpp"
DEFAULT_DTYPE = "f16"  # what ``secateurs export --to gguf`` writes


def genome_layers(space: Space, genome: Genome) -> tuple[LayerVariant, ...]:
    """Each layer's form in a genome of ``space``: (KV groups kept, MLP channels kept)."""
    return tuple(LayerVariant(kv, space.kept_channels(eighths)) for kv, eighths in genome)


def check_table(table: LatencyTable, space: Space) -> None:
    """The table must price this space's layers: same layer count, KV groups and MLP width."""
    shape = table.key.shape
    table_sizes = (shape.num_layers, shape.num_kv_heads, shape.intermediate_size)
    space_sizes = (space.num_layers, space.kv, space.channels)
    if table_sizes != space_sizes:
        raise ConfigError(
            f"The latency table is for {table_sizes[0]} layers of {table_sizes[1]} KV groups and "
            f"{table_sizes[2]} MLP channels; the model has {space_sizes[0]} of {space_sizes[1]} "
            f"and {space_sizes[2]}."
        )


@dataclass
class LatencyBudget:
    """``fraction`` of the dense model's predicted ``metric`` time per token, by ``table``.

    ``engine`` (optional) refuses genomes it cannot serve; its verdicts are memoised (the
    search asks about the same genomes many times)."""

    space: Space
    table: LatencyTable
    fraction: float
    metric: str = "decode"
    engine: Engine | None = None
    _servable: dict[Genome, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ConfigError(
                f"--latency is a fraction of the dense model's time per token in (0, 1), "
                f"not {self.fraction!r}."
            )
        if self.metric not in METRICS:
            raise ConfigError(f"Unknown latency metric {self.metric!r}; known: {METRICS}.")
        check_table(self.table, self.space)
        self._check_reachable()

    def _check_reachable(self) -> None:
        """The search starts from near-uniform genomes (every layer at one attention level,
        MLP levels nearly even): the fastest servable one must meet the budget."""
        n, dense = self.space.num_layers, self.dense_seconds()
        starts = [((kv, 0),) * n for kv in range(self.space.kv + 1)]
        fastest = min(self.seconds(g) for g in starts if self.servable(g))
        if self.fraction * dense < fastest:
            raise ConfigError(
                f"--latency {self.fraction} is below what the search can start from: every "
                f"layer without its MLP is {fastest / dense:.3f}× the dense model's predicted "
                f"{self.metric} time ({self.table.key.engine}'s table; the embedding and head "
                f"alone are {self.table.costs[self.metric]['base'] / dense:.3f}×)."
            )

    def seconds(self, genome: Genome, metric: str | None = None) -> float:
        """Predicted seconds per token of ``genome`` (the table's base + each layer's cost)."""
        return predict(self.table, genome_layers(self.space, genome), metric or self.metric)

    def dense_seconds(self, metric: str | None = None) -> float:
        return self.seconds(self.space.dense(), metric)

    def servable(self, genome: Genome) -> bool:
        if self.engine is None:
            return True
        if genome not in self._servable:
            self._servable[genome] = self._check(genome_layers(self.space, genome))
        return self._servable[genome]

    def _check(self, layers: tuple[LayerVariant, ...]) -> bool:
        if all(v.removed for v in layers):
            return False  # no model left
        try:
            self.engine.check_layers(self.table.key.shape, layers)
        except SecateursError:
            return False
        return True

    def removed(self, genome: Genome) -> float:
        """Seconds per token ``genome`` saves against the dense model (-inf: not servable)."""
        if not self.servable(genome):
            return -math.inf
        return self.dense_seconds() - self.seconds(genome)

    def goal(self) -> Goal:
        unit = f"seconds per token ({self.metric}, {self.table.key.engine})"
        return Goal(self.removed, (1 - self.fraction) * self.dense_seconds(), unit)

    def record(self, genome: Genome) -> dict[str, Any]:
        """What ``secateurs.json`` keeps: engine, metric, the table's provenance, the budget,
        and the predicted dense and pruned speeds (the measured ones join them later)."""
        key = self.table.key
        dense = {m: self.dense_seconds(m) for m in METRICS}
        pruned = {m: self.seconds(genome, m) for m in METRICS}
        return {
            "engine": key.engine,
            "engine_version": key.engine_version,
            "metric": self.metric,
            "fraction": self.fraction,
            "budget_seconds": (1 - self.fraction) * dense[self.metric],
            "target_seconds": self.fraction * dense[self.metric],
            "table": table_provenance(self.table),
            "predicted": {
                "dense": speeds(dense),
                "pruned": speeds(pruned),
                "ratio": {m: pruned[m] / dense[m] for m in METRICS},
            },
        }


def latency_goal(
    space: Space,
    fraction: float,
    table: LatencyTable,
    metric: str = "decode",
    engine: Engine | None = None,
) -> Goal:
    """The search's goal for ``fraction`` × the dense model's predicted ``metric`` time:
    ``removed(genome)`` = dense seconds/token − the genome's, ``amount`` = (1 − fraction) ×
    dense seconds/token."""
    return LatencyBudget(space, table, fraction, metric, engine).goal()


def speeds(seconds: dict[str, float]) -> dict[str, float]:
    """Seconds per token and tokens per second, per metric."""
    out: dict[str, float] = {}
    for metric, value in seconds.items():
        out[f"{metric}_s"] = value
        out[f"{metric}_tps"] = 1.0 / value if value > 0 else math.inf
    return out


def table_provenance(table: LatencyTable) -> dict[str, Any]:
    """Where a table's figures come from: its key (shape, engine build, weight type, machine,
    threads, clock, statistic), its cache digest, and how it was measured."""
    info = {k: table.info[k] for k in ("seconds", "load_before", "load_after") if k in table.info}
    return {
        "digest": table.key.digest(),
        "key": asdict(table.key),
        "measured": {**info, "models": len(table.design)},
    }


# --- which table ---------------------------------------------------------------------------------
def engine_table(
    config: Any,
    engine: str | Engine = DEFAULT_ENGINE,
    dtype: str = DEFAULT_DTYPE,
    cache: Path | None = None,
) -> LatencyTable:
    """The latency table of ``config``'s shape on ``engine``: a cached one measured with the
    default settings (by the least-disturbed sample, else by the median), else measured now
    (about 15 minutes of one CPU core for SmolLM2-135M; cached for every later run)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    engine = engine_for(engine)
    for statistic in STATISTICS:  # "min" first: the default, and robust on a shared machine
        key = table_key(shape, engine, dtype, BenchSettings(statistic=statistic))
        found = cached_table(key, cache)
        if found is not None:
            log.info("latency table %s from %s", key.digest(), cache_path(key, cache))
            return found
    log.warning(
        "No cached %s latency table for this model's shape on this machine: measuring one now "
        "(GGUF probes timed by llama.cpp; minutes of one CPU core, cached afterwards).",
        engine.name,
    )
    return measure_table(shape, engine=engine, dtype=dtype, cache=cache)


def spec_budget(
    space: Space, budget: Any, config: Any, table: LatencyTable | None = None
) -> LatencyBudget:
    """The latency budget of a spec's ``Budget`` (``latency``, ``engine``) for a model of
    ``config`` (its table found or measured unless given)."""
    engine = engine_for(budget.engine or DEFAULT_ENGINE)
    table = table if table is not None else engine_table(config, engine)
    return LatencyBudget(space, table, budget.latency, "decode", engine)


# --- the end-to-end check ------------------------------------------------------------------------
def recorded_table(checkpoint: str | os.PathLike, cache: Path | None = None) -> LatencyTable:
    """The table a ``--latency`` run priced its candidates with (from the cache, by the key
    its ``secateurs.json`` records)."""
    from secateurs.checkpoint import read_record

    latency = read_record(checkpoint).get("search", {}).get("latency")
    if not latency:
        raise ConfigError(f"{checkpoint} was not pruned under a latency budget (--latency).")
    key = TableKey.from_dict(latency["table"]["key"])
    table = cached_table(key, cache)
    if table is None:
        raise ConfigError(
            f"The latency table {key.digest()} that pruned {checkpoint} is not in the cache "
            f"({cache_path(key, cache)}): measured on another machine or cleared."
        )
    return table


def check_checkpoint(
    checkpoint: str | os.PathLike,
    table: LatencyTable | None = None,
    engine: str | Engine = DEFAULT_ENGINE,
    settings: BenchSettings | None = None,
) -> dict[str, Any]:
    """The written model's measured speed beside the table's prediction.

    Exports ``checkpoint`` as GGUF (``secateurs.export``, the table's weight type) and times it
    in the same passes as a dense probe of the table's shape, so the measured ratio to the
    dense model cancels how busy the machine was. Table: the one its record names, unless
    given; settings: the table's own."""
    from secateurs.export import export
    from secateurs.export.layout import read_layout

    table = table if table is not None else recorded_table(checkpoint)
    engine, key = engine_for(engine), table.key
    if engine.name != key.engine:
        raise ConfigError(f"The table is for {key.engine}, not {engine.name}.")
    settings = settings or table_settings(table)
    layers = layout_layers(read_layout(checkpoint), key.shape)
    dense = (keep(key.shape),) * key.shape.num_layers
    with tempfile.TemporaryDirectory(prefix="latency-check-") as work:
        gguf = export(checkpoint, "gguf", Path(work) / "model.gguf", dtype=key.dtype)
        dense_speed, speed = _time_together(engine, settings, gguf, key, dense)
    return compare_measured(table, layers, speed, dense_speed)


def table_settings(table: LatencyTable, **more: Any) -> BenchSettings:
    key = table.key
    return BenchSettings(threads=key.threads, n_prompt=key.n_prompt, n_gen=key.n_gen,
                         clock=key.clock, statistic=key.statistic, **more)  # fmt: skip


def _time_together(engine, settings, gguf, key, dense) -> tuple[Speed, Speed]:
    """The dense probe and the exported model timed in the same passes."""
    with tempfile.TemporaryDirectory(prefix="latency-dense-") as work:
        probe = engine.write_model(key.shape, dense, key.dtype, Path(work) / "dense")
        dense_speed, speed = engine.measure([probe, gguf], settings)
    return dense_speed, speed


def compare_measured(
    table: LatencyTable, layers: Sequence[LayerVariant], speed: Speed, dense: Speed
) -> dict[str, Any]:
    """Predicted and measured seconds/token and tokens/s, and both ratios to the dense model."""
    full = (keep(table.key.shape),) * table.key.shape.num_layers
    out: dict[str, Any] = {"layers": [[v.kv_groups, v.channels] for v in layers]}
    for metric in METRICS:
        predicted, measured = predict(table, layers, metric), getattr(speed, metric)
        out[metric] = {
            "predicted_tps": 1.0 / predicted,
            "measured_tps": 1.0 / measured,
            "error": predicted / measured - 1,
            "predicted_ratio": predicted / predict(table, full, metric),
            "measured_ratio": measured / getattr(dense, metric),
            "dense_measured_tps": 1.0 / getattr(dense, metric),
        }
    out["cpu_share"] = min(speed.cpu_share, dense.cpu_share)
    return out
