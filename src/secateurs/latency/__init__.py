"""Latency on a serving engine, per layer variant: measured once into a table, predicted
additively for any per-layer mix, checked end to end.

    from secateurs.latency import LayerVariant, measure_table, predict
    table = measure_table(model.config)                   # llama.cpp, f16, 1 thread; cached
    seconds = predict(table, [LayerVariant(3, 1536)] * 30)  # decode seconds per token

See docs/latency.md.
"""

from secateurs.latency.engines import ENGINES, BenchSettings, Engine, LlamaCpp, Speed
from secateurs.latency.measure import (
    cache_root,
    cached_table,
    check,
    compare,
    design,
    measure_and_check,
    measure_model,
    measure_models,
    measure_table,
    random_mixes,
    table_key,
)
from secateurs.latency.table import (
    METRICS,
    LatencyTable,
    LayerVariant,
    ModelShape,
    TableKey,
    fit_costs,
    keep,
    layer_variants,
    layout_layers,
    mlp_levels,
    plan_layers,
    predict,
    term_counts,
    terms,
    tokens_per_second,
)

__all__ = [
    "ENGINES",
    "METRICS",
    "BenchSettings",
    "Engine",
    "LatencyTable",
    "LayerVariant",
    "LlamaCpp",
    "ModelShape",
    "Speed",
    "TableKey",
    "cache_root",
    "cached_table",
    "check",
    "compare",
    "design",
    "fit_costs",
    "keep",
    "layer_variants",
    "layout_layers",
    "measure_and_check",
    "measure_model",
    "measure_models",
    "measure_table",
    "mlp_levels",
    "plan_layers",
    "predict",
    "random_mixes",
    "table_key",
    "term_counts",
    "terms",
    "tokens_per_second",
]
