"""Latency tables: the additive per-layer model and its fit are exact on synthetic numbers,
tables round-trip and are reused only for the key they were measured for, the probe models
have the shapes secateurs' surgery leaves, and (where llama.cpp is built) real timings."""

from __future__ import annotations

import math
from dataclasses import replace

import gguf
import pytest

from secateurs import llamacpp
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.export.layout import LayerShape, Layout, read_layout
from secateurs.latency import (
    BenchSettings,
    LatencyTable,
    LayerVariant,
    LlamaCpp,
    ModelShape,
    Speed,
    TableKey,
    cached_table,
    check,
    compare,
    design,
    fit_costs,
    keep,
    layer_variants,
    layout_layers,
    measure_model,
    measure_models,
    measure_table,
    mlp_levels,
    plan_layers,
    predict,
    random_mixes,
    term_counts,
)
from secateurs.latency.engines import probe_layout, random_state
from secateurs.latency.measure import save_table
from secateurs.latency.table import BASE, STUB
from secateurs.plan import Plan
from secateurs.units import apply_plan
from secateurs.writer import save_checkpoint
from tiny_models import TINY_CONFIGS, tiny_model

SMOLLM2 = ModelShape(30, 576, 9, 3, 64, 1536, 49152)
TINY = ModelShape.from_config({**TINY_CONFIGS["llama"], "num_hidden_layers": 6})


def synthetic_costs(shape: ModelShape) -> dict[str, float]:
    """Made-up seconds per term, distinct enough that any mix-up shows."""
    costs = {BASE: 1e-3, STUB: 3e-6}
    costs |= {f"attn:{g}": 1e-4 * g + 7e-6 for g in range(1, shape.num_kv_heads + 1)}
    costs |= {f"mlp:{c}": 2e-7 * c + 5e-6 for c in mlp_levels(shape)}
    return costs


def synthetic_table(shape: ModelShape = SMOLLM2, threads: int = 1) -> LatencyTable:
    key = TableKey(shape, "llama.cpp", "v0", "f16", threads, "cpu", 512, 128)
    costs = synthetic_costs(shape)
    return LatencyTable(key, {"decode": costs, "prompt": {k: v / 10 for k, v in costs.items()}})


def by_hand(costs: dict[str, float], layers: list[LayerVariant]) -> float:
    total = costs[BASE]
    for v in layers:
        total += costs.get(f"attn:{v.kv_groups}", 0.0)
        total += costs[f"mlp:{v.channels}"] if v.channels else (costs[STUB] if v.kv_groups else 0)
    return total


# --- the additive model ------------------------------------------------------------------------
def test_prediction_is_base_plus_each_layers_terms():
    table = synthetic_table()
    layers = [keep(SMOLLM2)] * 27 + [
        LayerVariant(0, 1536),  # attention dropped
        LayerVariant(3, 0),  # MLP dropped: the zero-FFN stub still runs
        LayerVariant(0, 0),  # block dropped: costs nothing
    ]
    costs = table.costs["decode"]
    expected = costs[BASE] + 28 * costs["mlp:1536"] + 28 * costs["attn:3"] + costs[STUB]
    assert predict(table, layers) == pytest.approx(expected, rel=1e-12)
    assert predict(table, layers, "prompt") == pytest.approx(expected / 10, rel=1e-12)


def test_least_squares_recovers_every_term_exactly_from_the_design():
    costs = synthetic_costs(SMOLLM2)
    models = [layers for _, layers in design(SMOLLM2)]
    seconds = [by_hand(costs, list(m)) for m in models]
    fitted, residuals = fit_costs([term_counts(m) for m in models], seconds)
    assert fitted.keys() == costs.keys()
    for term, value in costs.items():
        assert fitted[term] == pytest.approx(value, rel=1e-8, abs=1e-14), term
    assert max(abs(r) for r in residuals) < 1e-15


def test_overdetermined_fit_is_the_least_squares_solution():
    # y = base + n·a, measured with errors +e, -e at n = 1, 3: the fit splits the error evenly
    models = [{BASE: 1, "attn:1": 1}, {BASE: 1, "attn:1": 3}, {BASE: 1, "attn:1": 2}]
    fitted, residuals = fit_costs(models, [1.0 + 2.0 + 0.1, 1.0 + 6.0 - 0.1, 1.0 + 4.0])
    assert fitted[BASE] == pytest.approx(1.2)
    assert fitted["attn:1"] == pytest.approx(1.9)
    assert sum(residuals) == pytest.approx(0.0, abs=1e-12)


def test_a_design_that_cannot_separate_terms_is_refused():
    # attention and MLP always appear together: their split is arbitrary
    models = [{BASE: 1, "attn:3": n, "mlp:1536": n} for n in (1, 2, 3)]
    with pytest.raises(ConfigError, match="determine only 2 of 3 cost terms"):
        fit_costs(models, [1.0, 2.0, 3.0])


def test_unmeasured_mlp_widths_are_linear_between_levels_and_kv_levels_must_be_measured():
    table = synthetic_table()  # mlp cost is linear in c, so interpolation is exact
    costs = table.costs["decode"]
    for channels in (100, 250, 1500):
        assert table.cost(LayerVariant(0, channels)) == pytest.approx(2e-7 * channels + 5e-6)
    with pytest.raises(ConfigError, match="outside the measured levels"):
        table.cost(LayerVariant(0, 1600))
    del costs["attn:2"]
    with pytest.raises(ConfigError, match="no cost for 'attn:2'"):
        table.cost(LayerVariant(2, 1536))


def test_predict_checks_the_layer_count_and_metric():
    table = synthetic_table()
    with pytest.raises(ConfigError, match="29 layer variants given; the table's model has 30"):
        predict(table, [keep(SMOLLM2)] * 29)
    with pytest.raises(ConfigError, match="Unknown latency metric 'ttft'"):
        predict(table, [keep(SMOLLM2)] * 30, "ttft")


def test_random_mixes_are_predicted_as_the_sum_of_their_layers():
    table = synthetic_table()
    for _, layers in random_mixes(SMOLLM2, 10, seed=3):
        assert predict(table, layers) == pytest.approx(by_hand(table.costs["decode"], layers))


def test_compare_reports_time_and_ratio_errors():
    table = synthetic_table()
    models = random_mixes(SMOLLM2, 3, seed=1)
    full = (keep(SMOLLM2),) * 30

    def speed(layers, scale: float) -> Speed:
        times = {m: scale * predict(table, layers, m) for m in ("decode", "prompt")}
        return Speed(times["decode"], times["prompt"], {"decode": 0.0, "prompt": 0.0}, 1)

    exact = compare(table, models, [speed(m, 1.0) for _, m in models], speed(full, 1.0))
    assert all(abs(r[f"{m}_error"]) < 1e-12 for r in exact for m in ("decode", "prompt"))
    # a machine 25% slower for every model: every time is off by 1/1.25 - 1, no ratio is
    slow = compare(table, models, [speed(m, 1.25) for _, m in models], speed(full, 1.25))
    for row in slow:
        assert row["decode_error"] == pytest.approx(-0.2)
        assert row["decode_ratio_error"] == pytest.approx(0.0, abs=1e-12)
        assert row["prompt_predicted_ratio"] == pytest.approx(row["prompt_measured_ratio"])


# --- variants and designs ----------------------------------------------------------------------
def test_variant_enumeration_covers_every_form():
    variants = layer_variants(SMOLLM2)
    eighths = [192 * k for k in range(1, 9)]
    assert mlp_levels(SMOLLM2) == tuple(eighths)
    assert len(variants) == 4 * 9 and len(set(variants)) == 36
    assert {v.kv_groups for v in variants} == {0, 1, 2, 3}
    assert {v.channels for v in variants} == {0, *eighths}
    labels = {v.label(SMOLLM2) for v in variants}
    assert {
        "drop block",
        "no attn, MLP 1536/1536",
        "KV 3/3, no MLP",
        "KV 1/3, MLP 192/1536",
    } <= labels
    assert layer_variants(SMOLLM2, [512, 1024]) == tuple(
        LayerVariant(g, c) for g in range(4) for c in (0, 512, 1024, 1536)
    )
    with pytest.raises(ConfigError, match="not divisible into 7 levels"):
        mlp_levels(SMOLLM2, 7)
    with pytest.raises(ConfigError, match=r"MLP widths \[2048\] exceed"):
        layer_variants(SMOLLM2, [2048])


def test_design_keeps_layer_0_attention_and_has_one_model_per_term():
    models = design(SMOLLM2)
    assert len(models) == 1 + len(synthetic_costs(SMOLLM2)) - 1  # dense + one per other term
    assert all(layers[0] == keep(SMOLLM2) for _, layers in models)
    assert all(len(layers) == 30 for _, layers in models)
    assert all(layers[0].kv_groups for _, layers in random_mixes(SMOLLM2, 20))


def test_shape_from_a_transformers_config():
    config = {
        "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
        "vocab_size": 49152, "tie_word_embeddings": True,
    }  # fmt: skip
    assert ModelShape.from_config(config) == SMOLLM2
    assert SMOLLM2.heads_per_group == 3
    with pytest.raises(ConfigError, match="9 query heads do not split into 2 KV groups"):
        ModelShape(30, 576, 9, 2, 64, 1536, 49152)


# --- tables: JSON and the cache ----------------------------------------------------------------
def test_table_json_round_trip_is_exact():
    table = synthetic_table()
    table = LatencyTable(table.key, table.costs, [{"name": "dense", "layers": [[3, 1536]]}],
                         {"decode": [1e-9]}, {"load_before": [0.5, 0.4, 0.3]})  # fmt: skip
    again = LatencyTable.from_json(table.to_json())
    assert again == table
    assert again.key.shape == SMOLLM2


def test_cache_reuses_a_table_only_for_the_same_key(tmp_path):
    table = synthetic_table()
    save_table(table, tmp_path)
    assert cached_table(table.key, tmp_path) == table
    other_threads = synthetic_table(threads=2).key
    other_shape = synthetic_table(ModelShape(24, 576, 9, 3, 64, 1536, 49152)).key
    other_clock, other_statistic = (
        replace(table.key, clock="wall"),
        replace(table.key, statistic="median"),
    )
    for key in (other_threads, other_shape, other_clock, other_statistic):
        assert key.digest() != table.key.digest()
        assert cached_table(key, tmp_path) is None


def test_bench_settings_are_checked():
    with pytest.raises(ConfigError, match="Unknown clock 'tsc'; known: cpu, wall"):
        BenchSettings(clock="tsc")
    with pytest.raises(ConfigError, match="must all be positive"):
        BenchSettings(rounds=0)
    with pytest.raises(ConfigError, match="Unknown statistic 'mean'; known: min, median"):
        BenchSettings(statistic="mean")
    with pytest.raises(ConfigError, match="llama-bench reports wall time only"):
        LlamaCpp().measure_llama_bench([], BenchSettings())


# --- the probe models the engine serves --------------------------------------------------------
def test_probe_weights_have_the_shapes_surgery_leaves(tmp_path):
    """Random weights for (keep, 1 of 2 KV groups, no attention, no MLP, half MLP, block
    removed) name and size every tensor as apply_plan does on a real model; the plan and the
    saved checkpoint read back as the same per-layer forms."""
    model = tiny_model("llama")
    plan = Plan(
        num_layers=6, blocks=(5,), attn=(2,), mlp=(3,), num_heads=(2,) * 6,
        heads=((), (1,), (), (), (), ()), channels=((), (), (), (), tuple(range(32)), ()),
        num_channels=(64,) * 6,
    )  # fmt: skip
    variants = tuple(LayerVariant(*v) for v in [(2, 64), (1, 64), (0, 64), (2, 0), (2, 32), (0, 0)])
    assert plan_layers(plan, TINY) == variants
    pruned = apply_plan(model, plan)
    expected = {k: tuple(t.shape) for k, t in pruned.state_dict().items()}
    expected.pop("lm_head.weight")  # tied: the GGUF writer skips it
    state = random_state(TINY, variants)
    assert {k: tuple(t.shape) for k, t in state.items()} == expected
    save_checkpoint(pruned, None, tmp_path / "pruned", {})
    assert layout_layers(read_layout(tmp_path / "pruned"), TINY) == variants


def test_plans_and_checkpoints_of_another_shape_are_refused():
    with pytest.raises(ConfigError, match="Plan is for 6 layers; the shape has 30"):
        plan_layers(Plan(num_layers=6), SMOLLM2)
    in_group = Layout({}, (LayerShape(6, 3, 1536),))  # query heads cut inside the KV groups
    with pytest.raises(ConfigError, match="Layer 0 has 6 query heads over 3 KV heads"):
        layout_layers(in_group, SMOLLM2)
    assert (
        layout_layers(Layout({}, (LayerShape(9, 3, 1536),)), SMOLLM2)[1:]
        == (LayerVariant(0, 0),) * 29
    )


def test_probe_gguf_carries_the_per_layer_shapes(tmp_path):
    layers = [LayerVariant(2, 64), LayerVariant(1, 32), LayerVariant(0, 64), LayerVariant(0, 0),
              LayerVariant(2, 0), LayerVariant(2, 64)]  # fmt: skip
    path = LlamaCpp(tmp_path).write_model(TINY, layers, "f16", tmp_path / "probe")
    assert path.name == "probe.f16.gguf"
    reader = gguf.GGUFReader(path)
    fields = {f.name: f.contents() for f in reader.fields.values()}
    assert fields["general.architecture"] == "deci"
    assert fields["deci.block_count"] == 5  # the removed block is gone, not an empty layer
    assert fields["deci.attention.head_count"] == [4, 2, 0, 4, 4]
    assert fields["deci.attention.head_count_kv"] == [2, 1, 0, 2, 2]
    assert fields["deci.feed_forward_length"] == [64, 32, 64, 1, 64]  # 1: the zero-FFN stub


def test_probe_refuses_a_model_llama_cpp_cannot_load(tmp_path):
    layers = [LayerVariant(0, 64)] + [keep(TINY)] * 5
    with pytest.raises(UnsupportedModelError, match="layer 0 has no attention"):
        LlamaCpp(tmp_path).write_model(TINY, layers, "f16", tmp_path / "probe")
    with pytest.raises(ConfigError, match="weight types f16, f32, q8_0, q4_0; got 'bf16'"):
        LlamaCpp(tmp_path).write_model(TINY, [keep(TINY)] * 6, "bf16", tmp_path / "probe")
    assert probe_layout(TINY, [keep(TINY)] * 6).uniform  # exported as plain llama
    # what matters is the first layer kept: block 0 may go if layer 1 keeps its attention
    engine, gone = LlamaCpp(tmp_path), LayerVariant(0, 0)
    engine.check_layers(TINY, [gone] + [keep(TINY)] * 5)
    with pytest.raises(UnsupportedModelError, match="layer 0 has no attention"):
        engine.check_layers(TINY, [gone, LayerVariant(0, 64)] + [keep(TINY)] * 4)


# --- real timings (where llama-bench is built) -------------------------------------------------
MEDIUM = ModelShape(8, 256, 8, 4, 32, 1024, 2048)
QUICK = BenchSettings(n_prompt=32, n_gen=16, repetitions=2, rounds=1)
needs_bench = pytest.mark.skipif(
    llamacpp.cached_llama_bench() is None,
    reason=f"llama-bench not built (python -c 'from secateurs import llamacpp; "
    f"llamacpp.llama_bench()'; cache ${llamacpp.CACHE_ENV})",
)


@needs_bench
def test_llama_bench_times_deeper_models_as_slower(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_LATENCY_CACHE", str(tmp_path))
    full = keep(MEDIUM)
    models = [(full,) * 8, (full,) + (LayerVariant(0, 0),) * 7]
    dense, one = measure_models(MEDIUM, models, settings=QUICK)
    # 8 layers against 1 with the same head and embedding: clearly more than twice the time
    assert dense.decode > 2 * one.decode and dense.prompt > 2 * one.prompt
    assert dense.samples == 2 and dense.decode == min(dense.values["decode"])  # least disturbed
    assert 0 < dense.cpu_share < 1.05  # a single thread's CPU time cannot exceed its wall time
    assert dense.decode < 1.05 * dense.wall["decode"]  # the CPU clock: at most the wall time
    (bench,) = LlamaCpp().measure_llama_bench(
        [LlamaCpp().write_model(MEDIUM, models[0], "f16", tmp_path / "d")],
        replace(QUICK, clock="wall"),
    )
    assert bench.samples == 2 and bench.decode > 0 and math.isnan(bench.cpu_share)  # no CPU clock
    assert not list((tmp_path / "work").iterdir())  # the probe files are removed


@needs_bench
def test_measure_model_reads_a_served_file_and_tables_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SECATEURS_LATENCY_CACHE", str(tmp_path))
    path = LlamaCpp().write_model(MEDIUM, [keep(MEDIUM)] * 8, "f16", tmp_path / "dense")
    speed = measure_model(path, settings=QUICK)
    assert speed["decode_tps"] == pytest.approx(1 / speed["decode_s"])
    assert speed["prompt_tps"] > speed["decode_tps"]  # a batch of 32 beats one token at a time
    table = measure_table(MEDIUM, channels=[512], settings=QUICK)
    assert set(table.costs["decode"]) == {BASE, STUB, "attn:1", "attn:2", "attn:3", "attn:4",
                                          "mlp:512", "mlp:1024"}  # fmt: skip
    again = measure_table(MEDIUM, channels=[512], settings=QUICK)  # no second measurement
    assert again == table
    dense = predict(table, [keep(MEDIUM)] * 8)
    assert dense == pytest.approx(table.design[0]["decode_s"], rel=1e-9)  # the fit is exact here
    (row,) = check(table, [("dense again", (keep(MEDIUM),) * 8)], settings=QUICK)
    assert row["decode_predicted_ratio"] == 1.0  # the same model as the reference
    assert 0.8 < row["decode_measured_ratio"] < 1.25  # timed twice in the same passes
    with pytest.raises(ConfigError, match="the settings it was measured with"):
        check(table, [], settings=replace(QUICK, threads=2))
