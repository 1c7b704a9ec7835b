"""Measure a latency table once per (shape, engine, weight type, machine, threads), cache it,
and check its predictions end to end on mixed models."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError
from secateurs.latency.engines import ENGINES, BenchSettings, Engine, Speed
from secateurs.latency.table import (
    LatencyTable,
    LayerVariant,
    ModelShape,
    TableKey,
    fit_costs,
    keep,
    layer_variants,
    mlp_levels,
    predict,
    term_counts,
)

log = logging.getLogger(__name__)

CACHE_ENV = "SECATEURS_LATENCY_CACHE"
Model = tuple[LayerVariant, ...]


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    root = explicit or os.environ.get(CACHE_ENV) or Path.home() / ".cache/secateurs/latency"
    return Path(root)


def engine_for(engine: str | Engine) -> Engine:
    return ENGINES.get(engine)() if isinstance(engine, str) else engine


def table_key(shape: ModelShape, engine: Engine, dtype: str, settings: BenchSettings) -> TableKey:
    return TableKey(
        shape=shape,
        engine=engine.name,
        engine_version=engine.version(),
        dtype=dtype,
        threads=settings.threads,
        machine=engine.machine(),
        n_prompt=settings.n_prompt,
        n_gen=settings.n_gen,
        clock=settings.clock,
        statistic=settings.statistic,
    )


def cache_path(key: TableKey, cache: Path | None = None) -> Path:
    return cache_root(cache) / f"{key.digest()}.json"


def cached_table(key: TableKey, cache: Path | None = None) -> LatencyTable | None:
    """The table measured for exactly ``key``, if any (a key mismatch is never reused)."""
    path = cache_path(key, cache)
    if not path.is_file():
        return None
    table = LatencyTable.from_json(path.read_text())
    return table if table.key == key else None


def save_table(table: LatencyTable, cache: Path | None = None) -> Path:
    path = cache_path(table.key, cache)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(table.to_json() + "\n")
    os.replace(tmp, path)
    return path


# --- which models to measure -------------------------------------------------------------------
def design(shape: ModelShape, channels: Sequence[int] | None = None) -> list[tuple[str, Model]]:
    """The models that determine every cost term: the dense model; for each attention and MLP
    level one model whose layers 1..L-1 all take it (the largest signal per term; layer 0 stays
    dense, as llama.cpp reads the head size from layer 0); and the dense model without its
    second half, which separates the base cost from the layers'. Half, not all but one: a
    one-layer model's weights fit in the CPU cache and its layer runs faster than in any model
    a search would consider (measured on SmolLM2: prompt time per layer ~1.7× lower)."""
    full, count = keep(shape), shape.num_layers - 1
    if count < 1:
        raise ConfigError("A latency table needs a model of at least 2 layers.")

    def rest(variant: LayerVariant) -> Model:
        return (full, *(variant,) * count)

    half = shape.num_layers // 2
    gone = (LayerVariant(0, 0),) * half
    models = [
        ("dense", (full,) * shape.num_layers),
        (f"{half} blocks removed", (full,) * (shape.num_layers - half) + gone),
    ]
    for g in range(shape.num_kv_heads):
        name = f"attention {g}/{shape.num_kv_heads} KV groups"
        models.append((name, rest(LayerVariant(g, full.channels))))
    for c in sorted({0, *(channels or mlp_levels(shape))} - {full.channels}):
        models.append((f"MLP {c}/{full.channels}", rest(LayerVariant(full.kv_groups, c))))
    return models


def random_mixes(
    shape: ModelShape, count: int, seed: int = 0, channels: Sequence[int] | None = None
) -> list[tuple[str, Model]]:
    """``count`` models whose layers each take a random variant (layer 0 keeps attention)."""
    options = layer_variants(shape, channels)
    first = [v for v in options if v.kv_groups > 0]
    rng = random.Random(seed)
    mixes = []
    for i in range(count):
        layers = (rng.choice(first), *(rng.choice(options) for _ in range(shape.num_layers - 1)))
        mixes.append((f"random mix {i}", layers))
    return mixes


# --- measuring ---------------------------------------------------------------------------------
def measure_models(
    shape: ModelShape,
    models: Sequence[Model],
    engine: str | Engine = "llama.cpp",
    dtype: str = "f16",
    settings: BenchSettings | None = None,
) -> list[Speed]:
    """Write each model for the engine (in a temporary folder) and time them together."""
    engine, settings = engine_for(engine), settings or BenchSettings()
    engine.check_dtype(dtype)
    work = Path(tempfile.mkdtemp(prefix="latency-", dir=_work_root()))
    log.info("writing %d %s probe models of %s", len(models), engine.name, shape)
    try:
        files = [
            engine.write_model(shape, layers, dtype, work / f"m{i}")
            for i, layers in enumerate(models)
        ]
        return engine.measure(files, settings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _work_root() -> Path:
    root = cache_root() / "work"
    root.mkdir(parents=True, exist_ok=True)
    return root


def measure_model(
    model: str | os.PathLike,
    engine: str | Engine = "llama.cpp",
    settings: BenchSettings | None = None,
) -> dict[str, float]:
    """Decode and prompt tokens/s (and seconds per token) of one served model file."""
    engine, settings = engine_for(engine), settings or BenchSettings()
    if not Path(model).is_file():
        raise ConfigError(f"No model file at {model}.")
    return engine.measure([Path(model)], settings)[0].as_dict()


def load_average() -> list[float]:
    """1, 5 and 15-minute load averages (a list: what JSON gives back)."""
    return [round(x, 2) for x in os.getloadavg()]


def measure_table(
    config: Any,
    channels: Sequence[int] | None = None,
    engine: str | Engine = "llama.cpp",
    dtype: str = "f16",
    settings: BenchSettings | None = None,
    cache: Path | None = None,
    refresh: bool = False,
) -> LatencyTable:
    """The per-term latency table of ``config``'s shape on ``engine`` (cached; ``refresh``
    measures again). ``channels``: the MLP width levels to measure (default eighths)."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    engine, settings = engine_for(engine), settings or BenchSettings()
    key = table_key(shape, engine, dtype, settings)
    if not refresh and (found := cached_table(key, cache)) is not None:
        log.info("latency table for %s from the cache", shape)
        return found
    table, _, _ = _measure_and_fit(key, engine, settings, channels, ())
    save_table(table, cache)
    return table


def measure_and_check(
    config: Any,
    models: Sequence[tuple[str, Model]],
    channels: Sequence[int] | None = None,
    engine: str | Engine = "llama.cpp",
    dtype: str = "f16",
    settings: BenchSettings | None = None,
    cache: Path | None = None,
) -> tuple[LatencyTable, list[dict[str, Any]]]:
    """Measure the table (always; it is cached) and time ``models`` in the same passes: the
    additive model's own error, free of how the machine's load moved between two sessions."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    engine, settings = engine_for(engine), settings or BenchSettings()
    key = table_key(shape, engine, dtype, settings)
    table, dense, speeds = _measure_and_fit(key, engine, settings, channels, models)
    save_table(table, cache)
    return table, compare(table, models, speeds, dense)


def _measure_and_fit(
    key: TableKey,
    engine: Engine,
    settings: BenchSettings,
    channels: Sequence[int] | None,
    extra: Sequence[tuple[str, Model]],
) -> tuple[LatencyTable, Speed, list[Speed]]:
    """The fitted table, the dense model's speed and the ``extra`` models' speeds."""
    models = design(key.shape, channels)
    start, load = time.perf_counter(), load_average()
    layers = [m for _, m in (*models, *extra)]
    speeds = measure_models(key.shape, layers, engine, key.dtype, settings)
    table = fit_table(key, models, speeds[: len(models)])
    info = {
        "seconds": round(time.perf_counter() - start, 1),
        "load_before": load,
        "load_after": load_average(),
        "settings": {"repetitions": settings.repetitions, "rounds": settings.rounds},
        "timed_with": len(extra),  # other models in the same passes
    }
    table = LatencyTable(table.key, table.costs, table.design, table.residuals, info)
    return table, speeds[0], speeds[len(models) :]  # design()[0] is the dense model


def fit_table(
    key: TableKey, models: Sequence[tuple[str, Model]], speeds: Sequence[Speed]
) -> LatencyTable:
    """Least-squares costs per metric from measured models."""
    counts = [term_counts(layers) for _, layers in models]
    costs, residuals = {}, {}
    for metric in ("decode", "prompt"):
        costs[metric], residuals[metric] = fit_costs(counts, [getattr(s, metric) for s in speeds])
    design_rows = [
        {"name": name, "layers": [[v.kv_groups, v.channels] for v in layers], **speed.as_dict()}
        for (name, layers), speed in zip(models, speeds, strict=True)
    ]
    return LatencyTable(key, costs, design_rows, residuals)


def check(
    table: LatencyTable,
    models: Sequence[tuple[str, Model]],
    engine: str | Engine = "llama.cpp",
    settings: BenchSettings | None = None,
) -> list[dict[str, Any]]:
    """Predicted against measured speed of ``models``, timed now with the table's settings:
    seconds per token, and the ratio to the dense model's (timed in the same passes), which is
    what a budget like "0.7× the dense model" needs. When the machine's load changed since the
    table was measured, both move: memory-bound decode does not slow down uniformly."""
    engine = engine_for(engine)
    key = table.key
    settings = settings or BenchSettings(
        threads=key.threads,
        n_prompt=key.n_prompt,
        n_gen=key.n_gen,
        clock=key.clock,
        statistic=key.statistic,
    )
    names = ("threads", "n_prompt", "n_gen", "clock", "statistic")
    asked = {n: getattr(settings, n) for n in names}
    measured = {n: getattr(key, n) for n in names}
    if asked != measured:
        raise ConfigError(f"Check the table with the settings it was measured with ({measured}).")
    # the dense model is timed with them: its ratio to each cancels how busy the machine was
    dense = (keep(key.shape),) * key.shape.num_layers
    dense_speed, *speeds = measure_models(
        key.shape, [dense, *(m for _, m in models)], engine, key.dtype, settings
    )
    return compare(table, models, speeds, dense_speed)


def compare(
    table: LatencyTable,
    models: Sequence[tuple[str, Model]],
    speeds: Sequence[Speed],
    dense: Speed,
) -> list[dict[str, Any]]:
    """Per model: predicted and measured seconds per token, and their ratios to the dense
    model's (``dense``: its speed timed in the same passes)."""
    full = (keep(table.key.shape),) * table.key.shape.num_layers
    rows = []
    for (name, layers), speed in zip(models, speeds, strict=True):
        row: dict[str, Any] = {"name": name, "layers": [[v.kv_groups, v.channels] for v in layers]}
        row["cpu_share"] = speed.cpu_share
        for metric in ("decode", "prompt"):
            predicted, measured = predict(table, layers, metric), getattr(speed, metric)
            ratio = predicted / predict(table, full, metric)
            row[f"{metric}_predicted_s"] = predicted
            row[f"{metric}_measured_s"] = measured
            row[f"{metric}_error"] = predicted / measured - 1
            row[f"{metric}_predicted_ratio"] = ratio
            row[f"{metric}_measured_ratio"] = measured / getattr(dense, metric)
            row[f"{metric}_ratio_error"] = ratio / row[f"{metric}_measured_ratio"] - 1
            row[f"{metric}_spread"] = speed.spread[metric]
        rows.append(row)
    return rows
