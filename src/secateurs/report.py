"""A markdown report with PNG plots, from run directories and ``secateurs bench`` JSON.

A run directory is a model directory that may hold:
- ``secateurs.json`` (written by ``prune``): plan, per-criterion ``scores``, ``parameters``;
- ``results.json`` (the evaluation convention): ``{"parameters": int, "ppl": {dataset:
  {"ppl": float, "protocol": {...}} | float}, "zeroshot": {"scores": {task: value}, "mean": ...,
  "protocol": {...}}}``. ``secateurs eval zeroshot --save`` merges its key into it, and any
  other evaluation writes its own key with ``save_results``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.checkpoint import RECORD_FILE, write_json
from secateurs.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
KIND_COLORS = {"dense": "black", "depth": "tab:blue", "width": "tab:orange"}
FAR_ABOVE = 10.0  # a pruned PPL this many times its dense model's gets a warning


def ppl_warning(model: str, dataset: str, ppl: float, dense: str, base: float) -> str:
    """The warning for a pruned model whose PPL is far above its dense model's."""
    return (
        f"{model}: {dataset} PPL {ppl:,.2f} is {ppl / base:,.0f}x that of its dense model "
        f"{dense} ({base:,.2f}). The pruned model has lost most of its ability: remove fewer "
        "units, try another criterion, or recover it ('secateurs recover')."
    )


# --- results.json -------------------------------------------------------------------------------


def read_results(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RESULTS_FILE
    return read_json_file(path, "results file") if path.is_file() else {}


def read_json_file(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``, or a ConfigError naming the file and what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"Cannot read the {what} {path}: {err.strerror}.") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"The {what} {path} is not valid JSON ({err}); it is damaged or not a {what}."
        ) from err
    if not isinstance(data, dict):
        raise ConfigError(f"The {what} {path} holds {type(data).__name__}, not a JSON object.")
    return data


def save_results(directory: str | os.PathLike, key: str, value: Any) -> Path:
    """Merge ``{key: value}`` into ``directory/results.json`` (atomic write), and rewrite the
    model card of a secateurs output (a directory with ``secateurs.json``) to show it."""
    from secateurs.card import write_card

    path = Path(directory) / RESULTS_FILE
    write_json(path, {**read_results(directory), key: value})
    if (Path(directory) / RECORD_FILE).is_file():
        try:
            write_card(directory)
        except ConfigError as err:  # the results are saved; only the card could not follow
            log.warning("Model card of %s not updated: %s", directory, err)
    return path


# --- runs ---------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    name: str
    path: Path
    record: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int | None:
        return self.results.get("parameters") or self.record.get("parameters", {}).get("after")

    @property
    def kind(self) -> str:
        from secateurs.evaluate.efficiency import kind_of

        return kind_of(self.record)

    @property
    def removed(self) -> str:
        return describe_removed(self.record)

    def ppl(self) -> dict[str, float]:
        return _ppl_values(self.results.get("ppl", {}))

    def dense(self) -> RunInfo | None:
        """The dense model this run was compared with by ``eval ppl --save`` (a pseudo-run)."""
        entry = self.results.get("dense")
        if not entry:
            return None
        results = {"parameters": entry.get("parameters"), "ppl": entry.get("ppl", {})}
        return RunInfo(str(entry.get("model", "dense")), self.path, {}, results)


def _ppl_values(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v["ppl"] if isinstance(v, dict) else v) for k, v in values.items()}


def dense_points(runs: list[RunInfo]) -> list[RunInfo]:
    """Dense models recorded beside pruned runs, once each, unless already a run."""
    names = {r.name for r in runs}
    found: dict[str, RunInfo] = {}
    for run in runs:
        dense = run.dense()
        if dense is not None and dense.name not in names:
            found.setdefault(dense.name, dense)
    return list(found.values())


def far_above_dense(runs: list[RunInfo]) -> list[str]:
    """Warnings for runs whose PPL is more than ``FAR_ABOVE`` times their dense model's."""
    warnings = []
    for run in runs:
        dense = run.dense()
        if dense is None:
            continue
        for dataset, value in run.ppl().items():
            base = dense.ppl().get(dataset)
            if base and value > FAR_ABOVE * base:
                warnings.append(ppl_warning(run.name, dataset, value, dense.name, base))
    return warnings


def load_runs(paths: list[Path]) -> list[RunInfo]:
    runs = []
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"Run directory {path} does not exist.")
        if not (path / RECORD_FILE).is_file() and not (path / RESULTS_FILE).is_file():
            log.warning("%s has neither %s nor %s", path, RECORD_FILE, RESULTS_FILE)
        record_path = path / RECORD_FILE
        record = read_json_file(record_path, "run record") if record_path.is_file() else {}
        runs.append(RunInfo(path.name, path, record, read_results(path)))
    return runs


# --- tables -------------------------------------------------------------------------------------


def runs_table(runs: list[RunInfo]) -> str:
    datasets = sorted({d for r in runs for d in r.ppl()})
    scores = [r.results.get("zeroshot", {}).get("scores", {}) for r in runs]
    tasks = list(dict.fromkeys(task for run_scores in scores for task in run_scores))
    head = ["run", "kind", "removed", "params (M)", *[f"PPL {d}" for d in datasets], *tasks]
    head += ["zero-shot mean"] if tasks else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        zs = run.results.get("zeroshot", {})
        cells = [run.name, run.kind, run.removed, _num(run.parameters, 1e6, 2)]
        cells += [_num(run.ppl().get(d), 1, 2) for d in datasets]
        cells += [_num(zs.get("scores", {}).get(t), 1, 4) for t in tasks]
        cells += [_num(zs.get("mean"), 1, 4)] if tasks else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _num(value: float | None, scale: float, digits: int) -> str:
    return "–" if value is None else f"{value / scale:.{digits}f}"


# --- plots --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_importance(run: RunInfo, out: Path) -> list[Path]:
    """One PNG per (criterion, unit) score set: the sensitivity of every unit, removed ones in
    red, on a log scale (a symlog one if a score is ≤ 0) so that the few most important units
    (e.g. block 0, whose removal costs orders of magnitude more) do not hide the rest."""
    scores = run.record.get("scores") or []
    removed = _removed_units(run.record.get("plan") or {})
    return [_importance_figure(run, entry, removed, out) for entry in scores if entry["values"]]


def _importance_figure(run: RunInfo, entry: dict, removed: set, out: Path) -> Path:
    """Top: the scores (log). Bottom: each score's increase over the lowest one (log), which
    spreads the near-threshold units where the pruning decision is made."""
    plt = _pyplot()
    values, unit = [float(v) for v in entry["values"]], entry.get("unit", "block")
    criterion = entry.get("criterion", "?")
    gone = [i for i in range(len(values)) if (i, unit) in removed]
    protected = set((run.record.get("plan") or {}).get("protected") or [])
    colors = ["tab:red" if i in gone else "tab:gray" for i in range(len(values))]
    colors = ["lightgray" if i in protected else c for i, c in enumerate(colors)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True)
    # units a criterion does not score (protected: inf) get no bar, not an infinite one
    drawn = [v if math.isfinite(v) else float("nan") for v in values]
    top.bar(range(len(values)), drawn, color=colors)
    _sensitivity_scale(top, values)
    top.set_ylabel("score (log)")
    increase = _increase_over_lowest(values)
    bottom.bar(range(len(values)), increase, color=colors)
    bottom.set_yscale("log")
    bottom.set_ylabel("increase over lowest (log)")
    if gone:
        top.axhline(max(values[i] for i in gone), color="tab:red", linestyle="--", linewidth=0.8)
        bottom.axhline(max(increase[i] for i in gone), color="tab:red", linestyle="--", lw=0.8)
    top.set_title(
        f"{run.name}: {criterion} sensitivity of each {unit} (higher = keep; {len(gone)} removed)"
    )
    bottom.set_xlabel(f"{unit} index")
    top.legend(handles=_legend_patches(), loc="best", fontsize="small")
    return _save(fig, out / f"importance_{_slug(run.name)}_{_slug(criterion)}_{unit}.png")


def _increase_over_lowest(values: list[float]) -> list[float]:
    """``v - min`` with the lowest unit drawn at a floor (1% of the median increase); an
    unscored unit (inf or NaN) gets no bar."""
    finite = [v for v in values if v == v and abs(v) != float("inf")] or [0.0]
    low = min(finite)
    steps = sorted(v - low for v in finite if v > low)
    floor = 0.01 * steps[len(steps) // 2] if steps else 1.0
    return [max(v - low, floor) if math.isfinite(v) else float("nan") for v in values]


def _sensitivity_scale(ax, values: list[float]) -> None:
    """Log scale from just below the smallest score; symlog where scores reach zero or below."""
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if finite and min(finite) > 0:
        ax.set_yscale("log")
        ax.set_ylim(bottom=min(finite) / 1.5, top=max(finite) * 1.5)
        return
    nonzero = [abs(v) for v in finite if v != 0]
    ax.set_yscale("symlog", linthresh=min(nonzero) if nonzero else 1.0)


def plot_expert_usage(run: RunInfo, out: Path) -> Path | None:
    """Experts × MoE layers heatmap of router usage (or the expert scores when usage was not
    observed), with removed experts crossed out."""
    record = run.record
    values = record.get("expert_usage") or record.get("expert_scores")
    if not values:
        return None
    plt = _pyplot()
    layers = sorted(values, key=int)
    grid = [values[layer] for layer in layers]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(grid[0]) + 2), 0.35 * len(layers) + 1.8))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    plan = _plan_of(record)
    removed = {str(i): r for i, r in plan.removed_by_layer().items()} if plan else {}
    for row, layer in enumerate(layers):
        for expert in removed.get(layer, []):
            ax.text(expert, row, "x", ha="center", va="center", color="tab:red", fontsize=9)
    what = "router usage (share of tokens)" if record.get("expert_usage") else "expert score"
    fig.colorbar(image, ax=ax, label=what)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"{run.name}: {what}; x = removed")
    return _save(fig, out / f"experts_{_slug(run.name)}.png")


def _legend_patches() -> list:
    from matplotlib.patches import Patch

    return [
        Patch(color="tab:red", label="removed"),
        Patch(color="tab:gray", label="kept"),
        Patch(color="lightgray", label="protected"),
    ]


def _plan_of(record: dict[str, Any]) -> Any:
    """The record's ``Plan`` (any version's format); None for a record without a readable one."""
    from secateurs.plan import Plan  # torch: not for --help

    try:
        return Plan.of_record(record)
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def describe_removed(record: dict[str, Any]) -> str:
    """What a run removed, in a table cell: depth units by layer, width and expert counts."""
    plan = _plan_of(record)
    if plan is None:
        return "–"
    parts = [f"{k} {list(getattr(plan, k))}" for k in ("blocks", "attn", "mlp") if getattr(plan, k)]
    for kind in ("heads", "channels", "experts"):
        count = sum(map(len, plan.removed(kind)))
        if count:
            layers = sum(1 for units in plan.removed(kind) if units)
            parts.append(f"{count} {kind} in {layers} layers")
    return "; ".join(parts) or "–"


def _removed_units(plan: dict[str, Any]) -> set[tuple[int, str]]:
    units = {(i, "block") for i in plan.get("blocks", [])}
    return units | {(i, k) for k in ("attn", "mlp") for i in plan.get(k, [])}


def plot_ppl_vs_params(runs: list[RunInfo], out: Path) -> Path | None:
    """PPL against parameters, one line per dataset, dense models (runs or recorded beside
    pruned runs by ``eval ppl --save``) included and drawn as black stars."""
    fig = ppl_figure(runs)
    return None if fig is None else _save(fig, out / "ppl_vs_params.png")


def ppl_figure(runs: list[RunInfo]):
    """The figure of ``plot_ppl_vs_params`` (None without a point): each point labelled with
    its run and PPL, the log axis ticked in plain numbers."""
    everything = runs + dense_points(runs)
    points = [(r, d, p) for r in everything if r.parameters for d, p in r.ppl().items()]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dataset in sorted({d for _, d, _ in points}):
        series = sorted((r.parameters / 1e6, p, r.name) for r, d, p in points if d == dataset)
        ax.plot([s[0] for s in series], [s[1] for s in series], "o-", label=dataset)
        for x, y, name in series:
            label = f"{name}: {_ppl_label(y)}"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    dense = [(r.parameters / 1e6, p) for r, _, p in points if r.kind == "dense"]
    if dense:
        ax.plot(*zip(*dense, strict=True), "*", color="black", markersize=12, label="dense")
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity (log scale)")
    ax.margins(x=0.2)  # room for the labels of the outermost points
    readable_log_axis(ax, [p for _, _, p in points])
    ax.set_title("Perplexity vs parameters")
    ax.grid(alpha=0.3)
    ax.legend(title="dataset")
    return fig


def _ppl_label(value: float) -> str:
    return f"{value:,.1f}" if value < 1000 else f"{value:,.0f}"


def readable_log_axis(ax, values: list[float]) -> None:
    """A log y axis whose ticks are labelled in plain numbers at 1-2-5 steps (more within a
    narrow range): matplotlib's default labels only powers of ten, so a 60-150 range showed
    a single "10²"."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    low, high = min(values), max(values)
    ax.set_yscale("log")
    ax.set_ylim(low / 1.15, high * 1.15)
    ticks = log_ticks(low / 1.15, high * 1.15)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.10g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def log_ticks(low: float, high: float) -> list[float]:
    """Round values between ``low`` and ``high`` for a log axis: about 4 to 10 of them."""
    import math

    decades = math.log10(high / low)
    steps = (1, 1.5, 2, 3, 5, 7) if decades < 1 else (1, 2, 5) if decades < 3 else (1,)
    start, stop = math.floor(math.log10(low)), math.ceil(math.log10(high))
    every = max(1, math.ceil((stop - start) / 10))  # many decades: every n-th power of ten
    ticks = [step * 10.0**exp for exp in range(start, stop + 1, every) for step in steps]
    inside = [t for t in ticks if low <= t <= high]
    if len(inside) >= 3:
        return inside
    from matplotlib.ticker import MaxNLocator  # a narrow range: evenly spaced round values

    return [float(t) for t in MaxNLocator(nbins=5).tick_values(low, high) if low <= t <= high]


def plot_bench(bench: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Latency and throughput vs batch size, one line per model, coloured by kind."""
    plt = _pyplot()
    paths = []
    metrics = (
        ("latency_s", "latency (s)", "latency"),
        ("throughput_tok_s", "throughput (tokens/s)", "throughput"),
    )
    new_tokens = bench.get("protocol", {}).get("new_tokens", "?")
    device = bench.get("protocol", {}).get("device", "?")
    for key, label, name in metrics:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for index, model in enumerate(bench["models"]):
            rows = [r for r in model["results"] if r.get(key) is not None]
            style = ["-", "--", ":", "-."][index % 4]
            color = KIND_COLORS.get(model.get("kind"))
            ax.plot(
                [r["batch_size"] for r in rows],
                [r[key] for r in rows],
                marker="o",
                linestyle=style,
                color=color,
                label=f"{model['name']} ({model.get('kind')})",
            )
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch_size"] for m in bench["models"] for r in m["results"]})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.set_title(f"{name.capitalize()} for {new_tokens} new tokens ({device})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(_save(fig, out / f"{name}_vs_batch_{stem}.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


# --- the page -----------------------------------------------------------------------------------


def build_report(
    run_dirs: list[Path], bench_files: list[Path], out: Path, title: str = "secateurs report"
) -> Path:
    """Write ``out/index.md`` and its PNGs; return the page's path."""
    if not run_dirs and not bench_files:
        raise ConfigError("Nothing to report: give run directories and/or --bench files.")
    runs = load_runs(list(run_dirs))
    benches = [(path, load_bench(path)) for path in bench_files]  # all read before any writing
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# {title}\n"]
    if runs:
        sections += _runs_section(runs, out)
    for path, bench in benches:
        sections += _bench_section(path, bench, out)
    page = out / "index.md"
    page.write_text("\n".join(sections) + "\n")
    log.info("Report written to %s", page)
    return page


def _runs_section(runs: list[RunInfo], out: Path) -> list[str]:
    lines = ["## Runs\n", runs_table(runs + dense_points(runs)), ""]
    for message in far_above_dense(runs):
        log.warning(message)
        lines += [f"> **Warning**: {message}", ""]
    lines += _generations_section(runs)
    ppl_plot = plot_ppl_vs_params(runs, out)
    if ppl_plot:
        lines += ["## Perplexity vs parameters\n", f"![PPL vs parameters]({ppl_plot.name})", ""]
    importance = [p for r in runs for p in plot_importance(r, out)]
    if importance:
        lines += ["## Per-unit sensitivity, one plot per criterion (removed units in red)\n"]
        lines += [f"![importance]({p.name})\n" for p in importance]
    experts = [p for p in (plot_expert_usage(r, out) for r in runs) if p]
    if experts:
        lines += ["## Expert usage per MoE layer\n", *[f"![experts]({p.name})\n" for p in experts]]
    return lines


def load_bench(path: Path) -> dict[str, Any]:
    """A ``secateurs bench --json`` file, checked enough to draw it (clear errors otherwise)."""
    if not path.is_file():
        raise ConfigError(f"Bench file {path} does not exist.")
    bench = read_json_file(path, "bench file")
    models = bench.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError(
            f"The bench file {path} has no 'models' list: write it with 'secateurs bench --json'."
        )
    for model in models:
        missing = _missing_bench_keys(model)
        if missing:
            raise ConfigError(
                f"The bench file {path} has a model entry without {missing}: it is damaged or "
                "from another tool; write it again with 'secateurs bench --json'."
            )
    return bench


BENCH_MODEL_KEYS = ("name", "kind", "parameters", "macs_per_token", "ideal_speedup", "results")


def _missing_bench_keys(model: Any) -> list[str]:
    if not isinstance(model, dict):
        return list(BENCH_MODEL_KEYS)
    missing = [key for key in BENCH_MODEL_KEYS if key not in model]
    rows = model.get("results")
    if not isinstance(rows, list) or any(
        not isinstance(r, dict) or "batch_size" not in r for r in rows
    ):
        missing.append("results[].batch_size")
    return missing


def _generations_section(runs: list[RunInfo]) -> list[str]:
    """Each run's greedy continuations beside its dense model's (``eval generate --save``)."""
    from secateurs.evaluate.generate import side_by_side

    tables = [(run.name, side_by_side(run.results, run.name)) for run in runs]
    tables = [(name, table) for name, table in tables if table]
    if not tables:
        return []
    lines = [
        "## Greedy generations\n",
        "distinct-n: distinct word n-grams / all n-grams of the continuation (1 = no "
        "repetition; a loop drives it toward 0).\n",
    ]
    for name, table in tables:
        lines += [f"### {name}\n", table, ""]
    return lines


def _bench_section(path: Path, bench: dict[str, Any], out: Path) -> list[str]:
    from secateurs.evaluate.efficiency import format_table

    protocol = bench.get("protocol", {})
    plots = plot_bench(bench, out, _slug(path.stem))
    summary = ", ".join(
        f"{k}={protocol[k]}"
        for k in ("device", "new_tokens", "prompt_len", "repeats", "threads")
        if k in protocol
    )
    lines = [f"## Efficiency: {path.name}\n", f"Protocol: {summary}. Medians of the repeats.\n"]
    lines += [format_table(bench), ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in plots]
    return lines
