"""llama.cpp latency of SmolLM2-135M's per-layer variants: the table, and its end-to-end check.

Measures (``secateurs.latency``) decode (batch 1, one token at a time) and prompt time per token
of random-weight GGUF probes of the model's exact shape, written by secateurs' own exporter and
timed with llama-bench's tests by ``llama_speed`` (which also reports the process's CPU time):
the dense model, one model per attention level and per MLP level (layers 1..L-1 in that form),
and a one-layer model; fits the additive per-layer table by least squares; then measures models
the fit never saw (uniform prunings and random per-layer mixes) and compares them with the
table's predictions; last, the dense model at 1 and 2 threads by our timer and by llama-bench
itself. Records the load average and each sample's CPU share: wall-clock timings are only as
good as the machine was quiet, CPU-time ones (the default) much less sensitive.

    python benchmarks/latency.py                          # 1 thread, f16, pp512 / tg128, CPU time
    python benchmarks/latency.py --quick                  # small settings, to try it out
    python benchmarks/latency.py --dtype q8_0 --threads 2 --clock wall
    python benchmarks/latency.py --check-model OUT        # a --latency model, end to end

Writes benchmarks/results/latency.{json,md} (table and checks) and latency-reference.{json,md}
(the dense model by our timer and by llama-bench, 1 and 2 threads); ``--check-model`` writes
``NAME-check.{json,md}``; ``--name`` to change.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_results  # noqa: E402

from secateurs.latency import (  # noqa: E402
    BenchSettings,
    LatencyTable,
    LayerVariant,
    LlamaCpp,
    ModelShape,
    check,
    keep,
    measure_and_check,
    measure_table,
    mlp_levels,
    random_mixes,
)
from secateurs.latency.budget import check_checkpoint, recorded_table  # noqa: E402
from secateurs.latency.measure import cache_root, load_average  # noqa: E402


def shape_of(model: str) -> ModelShape:
    from secateurs.checkpoint import read_config_dict
    from secateurs.models import resolve_model

    return ModelShape.from_config(read_config_dict(resolve_model(model)))


def uniform_checks(shape: ModelShape) -> list[tuple[str, tuple[LayerVariant, ...]]]:
    """Pruned models the fit never saw: uniform widths (exported as plain ``llama``), depth, and
    branch removals as the engines benchmark prunes them."""
    full, n = keep(shape), shape.num_layers
    five_eighths = shape.intermediate_size * 5 // 8
    half = LayerVariant(shape.num_kv_heads - 1, shape.intermediate_size // 2)
    gone = LayerVariant(0, 0)
    mid = range(n // 2 - 2, n // 2 + 4)  # 6 middle blocks (13-18 of 30), as depth pruning picks
    return [
        ("uniform MLP 5/8 (llama arch)", (LayerVariant(full.kv_groups, five_eighths),) * n),
        ("KV -1 group and MLP 1/2, layers 1..L-1", (full, *(half,) * (n - 1))),
        ("6 middle blocks removed", tuple(gone if i in mid else full for i in range(n))),
        (
            "attention removed in 8 late layers",
            _with(full, n, range(n - 10, n - 2), (0, full.channels)),
        ),
        ("MLP removed in 4 late layers", _with(full, n, range(n - 6, n - 2), (full.kv_groups, 0))),
    ]


def _with(full, n, layers, variant) -> tuple[LayerVariant, ...]:
    return tuple(LayerVariant(*variant) if i in layers else full for i in range(n))


def table_rows(table: LatencyTable) -> list[dict]:
    """One row per layer form: its decode and prompt cost, and its share of a dense layer."""
    shape = table.key.shape
    full = keep(shape)
    forms = [
        ("keep", full),
        ("drop attention", LayerVariant(0, full.channels)),
        ("drop MLP", LayerVariant(full.kv_groups, 0)),
        ("drop block", LayerVariant(0, 0)),
    ]
    forms += [
        (f"KV groups {g}/{shape.num_kv_heads}", LayerVariant(g, full.channels))
        for g in range(shape.num_kv_heads - 1, 0, -1)
    ]
    forms += [
        (f"MLP {c}/{full.channels}", LayerVariant(full.kv_groups, c))
        for c in sorted(mlp_levels(shape), reverse=True)[1:]
    ]
    dense = {m: table.cost(full, m) for m in ("decode", "prompt")}
    rows = [
        {
            "form": "base (embedding, head, overhead)",
            "decode_ms": 1e3 * table.costs["decode"]["base"],
            "prompt_us": 1e6 * table.costs["prompt"]["base"],
        }
    ]
    for name, variant in forms:
        rows.append(
            {
                "form": name,
                "decode_ms": 1e3 * table.cost(variant, "decode"),
                "prompt_us": 1e6 * table.cost(variant, "prompt"),
                "decode_share": table.cost(variant, "decode") / dense["decode"],
                "prompt_share": table.cost(variant, "prompt") / dense["prompt"],
            }
        )
    return rows


def error_summary(rows: list[dict], metric: str) -> dict[str, float]:
    errors = [abs(r[f"{metric}_error"]) for r in rows]
    ratios = [abs(r[f"{metric}_ratio_error"]) for r in rows]
    return {
        "mean_abs_pct": 100 * mean(errors),
        "max_abs_pct": 100 * max(errors),
        "ratio_mean_abs_pct": 100 * mean(ratios),
        "ratio_max_abs_pct": 100 * max(ratios),
    }


def check_rows(rows: list[dict]) -> list[dict]:
    shown = []
    for r in rows:
        row = {"model": r["name"]}
        for m in ("decode", "prompt"):
            row[f"{m}_pred"] = 1 / r[f"{m}_predicted_s"]
            row[f"{m}_meas"] = 1 / r[f"{m}_measured_s"]
            row[f"{m}_err"] = f"{100 * r[f'{m}_error']:+.1f}"
            row[f"{m}_ratio"] = (
                f"{r[f'{m}_predicted_ratio']:.3f} / {r[f'{m}_measured_ratio']:.3f} "
                f"({100 * r[f'{m}_ratio_error']:+.1f}%)"
            )
        row["spread"] = f"{100 * r['decode_spread']:.1f} / {100 * r['prompt_spread']:.1f}"
        shown.append(row)
    return shown


def reference_rows(shape: ModelShape, args: argparse.Namespace) -> list[dict]:
    """The dense model at 1 and 2 threads, timed by our timer (CPU and wall clock) and by
    llama-bench itself (wall clock): the figures users reproduce, and how far ours are."""
    engine, dense = LlamaCpp(), (keep(shape),) * shape.num_layers
    path = engine.write_model(shape, dense, args.dtype, cache_root() / "work" / "reference")
    rows = []
    try:
        for threads in (1, 2):
            ours = engine.measure([path], _settings(args, threads))[0].as_dict()
            (bench,) = engine.measure_llama_bench([path], _settings(args, threads, "wall"))
            rows.append(
                {
                    "threads": threads,
                    **ours,
                    "bench_decode_tps": 1 / bench.decode,
                    "bench_prompt_tps": 1 / bench.prompt,
                    "load": load_average(),
                }
            )
    finally:
        path.unlink()
    return rows


def _settings(
    args: argparse.Namespace, threads: int | None = None, clock: str | None = None
) -> BenchSettings:
    return BenchSettings(
        threads=threads or args.threads,
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        repetitions=args.repetitions,
        rounds=args.rounds,
        clock=clock or args.clock,
        statistic=args.statistic,
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="whose shape (config) to time")
    parser.add_argument("--dtype", default="f16", help="GGUF weights: f16, f32, q8_0, q4_0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", default="cpu", help="cpu (robust when shared) or wall")
    parser.add_argument("--statistic", default="min", help="min (least disturbed) or median")
    parser.add_argument("--n-prompt", type=int, default=512)
    parser.add_argument("--n-gen", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=2, help="samples per model per pass")
    parser.add_argument("--rounds", type=int, default=3, help="passes, each in a fresh order")
    parser.add_argument("--mixes", type=int, default=10, help="random per-layer mixes to check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cached",
        action="store_true",
        help="use the cached table (measured if missing) and time the checks afterwards",
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="skip the dense model's llama-bench rows"
    )
    parser.add_argument(
        "--reference-only", action="store_true", help="only the dense model's llama-bench rows"
    )
    parser.add_argument(
        "--check-model",
        type=Path,
        default=None,
        metavar="DIR",
        help="only the end-to-end check of a model pruned with --latency: export it as GGUF, "
        "time it beside the dense model, compare with the prediction its record keeps",
    )
    parser.add_argument("--quick", action="store_true", help="pp64 / tg16, 1 pass: a try-out")
    parser.add_argument("--name", default="latency", help="results file name")
    args = parser.parse_args()
    if args.quick:
        args.n_prompt, args.n_gen, args.repetitions, args.rounds = 64, 16, 1, 1
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # one line per tensor written
    if args.check_model is not None:
        return check_model(args.check_model, args.name)
    shape = shape_of(args.model)
    if not args.reference_only:
        table_and_checks(shape, args)
    if not args.no_reference:
        start, reference = time.perf_counter(), reference_rows(shape, args)
        data = {"rows": reference, "seconds": round(time.perf_counter() - start, 1)}
        intro = (
            f"The dense {args.model} ({args.dtype} GGUF, pp{args.n_prompt} / tg{args.n_gen}) by "
            f"our timer and by llama-bench itself, on {LlamaCpp().machine()}; "
            f"{data['seconds']} s. CPU share below ~0.95: others competed, wall figures are low."
        )
        write_results(f"{args.name}-reference", data, f"{intro}\n\n{_reference(reference)}")


def table_and_checks(shape: ModelShape, args: argparse.Namespace) -> None:
    settings = _settings(args)
    start, load_before = time.perf_counter(), load_average()
    models = uniform_checks(shape) + random_mixes(shape, args.mixes, seed=args.seed)
    if args.cached:  # the table as cached (or measured now), the checks timed afterwards
        table = measure_table(shape, dtype=args.dtype, settings=settings)
        checks = check(table, models, settings=settings)
    else:  # the checks timed in the same passes as the table's models
        table, checks = measure_and_check(shape, models, dtype=args.dtype, settings=settings)
    table_seconds = table.info.get("seconds", 0.0)
    dense = table.design[0]
    data = {
        "key": table.to_dict()["key"],
        "table": table.to_dict(),
        "checks": checks,
        "error_summary": {m: error_summary(checks, m) for m in ("decode", "prompt")},
        "dense": {k: dense[k] for k in ("decode_tps", "prompt_tps", "decode_s", "prompt_s")},
        "load_before": load_before,
        "load_after": load_average(),
        "cpu_share": min(r["cpu_share"] for r in [*table.design, *checks]),
        "timed_together": not args.cached,
        "seconds": {"table": table_seconds, "total": round(time.perf_counter() - start, 1)},
    }
    write_results(args.name, data, report(table, checks, data))


def check_model(directory: Path, name: str) -> None:
    """A ``--latency`` model's measured llama.cpp speed beside its recorded prediction."""
    from secateurs.checkpoint import read_record

    table, load_before = recorded_table(directory), load_average()
    start = time.perf_counter()
    measured = check_checkpoint(directory, table)
    latency = read_record(directory)["search"]["latency"]
    data = {
        "model": str(directory),
        "recorded": latency,
        "measured": measured,
        "load_before": load_before,
        "load_after": load_average(),
        "seconds": round(time.perf_counter() - start, 1),
    }
    rows = [
        {
            "metric": metric,
            "dense_meas": m["dense_measured_tps"],
            "dense_pred": latency["predicted"]["dense"][f"{metric}_tps"],
            "pred": m["predicted_tps"],
            "meas": m["measured_tps"],
            "err": 100 * m["error"],
            "ratio": f"{m['predicted_ratio']:.3f} / {m['measured_ratio']:.3f}",
        }
        for metric, m in ((k, measured[k]) for k in ("decode", "prompt"))
    ]
    key = table.key
    head = (
        f"{directory} (--latency {latency['fraction']}, {latency['metric']}), exported as "
        f"{key.dtype} GGUF and timed by llama.cpp ({key.engine_version}, {key.threads} "
        f"thread(s), pp{key.n_prompt} / tg{key.n_gen}, {key.clock} clock, {key.statistic} of "
        f"the samples) in the same passes as a dense probe, on {key.machine}; table "
        f"{key.digest()}. Load average before / after: {_load(load_before)} / "
        f"{_load(data['load_after'])}; lowest CPU share {measured['cpu_share']:.2f}; "
        f"{data['seconds']} s."
    )
    columns = [
        ("metric", "metric"),
        ("dense_pred", "dense tok/s predicted"),
        ("dense_meas", "dense tok/s measured"),
        ("pred", "pruned tok/s predicted"),
        ("meas", "pruned tok/s measured"),
        ("err", "time error %"),
        ("ratio", "time / dense: predicted / measured"),
    ]
    write_results(f"{name}-check", data, f"{head}\n\n{markdown_table(rows, columns)}")


def report(table: LatencyTable, checks: list[dict], data: dict) -> str:
    key = table.key
    together = (
        "the checked models timed in the same passes as the table's"
        if data["timed_together"]
        else f"the table as cached (measured in {table.info.get('seconds')} s), the checked "
        "models timed afterwards"
    )
    head = (
        f"llama.cpp ({key.engine_version}), {key.dtype} GGUF, {key.threads} thread(s), "
        f"pp{key.n_prompt} / tg{key.n_gen}, {key.clock} clock, {key.statistic} of the samples, "
        f"on {key.machine}. Dense model: "
        f"{data['dense']['decode_tps']:.1f} decode tokens/s, {data['dense']['prompt_tps']:.1f} "
        f"prompt tokens/s. Load average before / after: {_load(data['load_before'])} / "
        f"{_load(data['load_after'])}; {together} in {data['seconds']['total']} s. Lowest CPU "
        f"share of a timed sample (CPU time / wall time / threads; below ~0.95 others "
        f"competed): {data['cpu_share']:.2f}."
    )
    costs = markdown_table(
        table_rows(table),
        [
            ("form", "layer form"),
            ("decode_ms", "decode ms/token"),
            ("decode_share", "× dense layer"),
            ("prompt_us", "prompt µs/token"),
            ("prompt_share", "× dense layer"),
        ],
    )
    errors = "; ".join(
        f"{m}: time mean |error| {s['mean_abs_pct']:.1f}% (max {s['max_abs_pct']:.1f}%), "
        f"ratio to dense {s['ratio_mean_abs_pct']:.1f}% (max {s['ratio_max_abs_pct']:.1f}%)"
        for m, s in data["error_summary"].items()
    )
    checked = markdown_table(
        check_rows(checks),
        [
            ("model", "model (not in the fit)"),
            ("decode_pred", "decode tok/s predicted"),
            ("decode_meas", "measured"),
            ("decode_err", "time error %"),
            ("decode_ratio", "decode time / dense: predicted / measured"),
            ("prompt_pred", "prompt tok/s predicted"),
            ("prompt_meas", "measured"),
            ("prompt_err", "time error %"),
            ("prompt_ratio", "prompt time / dense: predicted / measured"),
            ("spread", "spread % (decode / prompt)"),
        ],
    )
    return "\n\n".join([head, costs, f"Prediction against measurement ({errors}):", checked])


def _reference(rows: list[dict]) -> str:
    return markdown_table(
        rows,
        [
            ("threads", "threads"),
            ("decode_tps", "decode tok/s (table's clock)"),
            ("decode_wall_tps", "decode tok/s (wall)"),
            ("bench_decode_tps", "llama-bench decode tok/s"),
            ("prompt_tps", "prompt tok/s (table's clock)"),
            ("prompt_wall_tps", "prompt tok/s (wall)"),
            ("bench_prompt_tps", "llama-bench prompt tok/s"),
            ("cpu_share", "CPU share"),
            ("load", "load average after"),
        ],
    )


def _load(values) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
