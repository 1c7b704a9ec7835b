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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secateurs.checkpoint import RECORD_FILE, read_record, write_json
from secateurs.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
KIND_COLORS = {"dense": "black", "depth": "tab:blue", "width": "tab:orange"}


# --- results.json -------------------------------------------------------------------------------


def read_results(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_results(directory: str | os.PathLike, key: str, value: Any) -> Path:
    """Merge ``{key: value}`` into ``directory/results.json`` (atomic write)."""
    path = Path(directory) / RESULTS_FILE
    write_json(path, {**read_results(directory), key: value})
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
        plan = self.record.get("plan") or {}
        parts = [f"{k} {v}" for k, v in plan.items() if k not in ("num_layers", "protected") and v]
        return "; ".join(parts) or "–"

    def ppl(self) -> dict[str, float]:
        values = self.results.get("ppl", {})
        return {k: float(v["ppl"] if isinstance(v, dict) else v) for k, v in values.items()}


def load_runs(paths: list[Path]) -> list[RunInfo]:
    runs = []
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"Run directory {path} does not exist.")
        if not (path / RECORD_FILE).is_file() and not (path / RESULTS_FILE).is_file():
            log.warning("%s has neither %s nor %s", path, RECORD_FILE, RESULTS_FILE)
        runs.append(RunInfo(path.name, path, read_record(path), read_results(path)))
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


def plot_importance(run: RunInfo, out: Path) -> Path | None:
    """One panel per (criterion, unit) score set; removed units drawn in red."""
    scores = run.record.get("scores") or []
    if not scores:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(scores), 1, figsize=(8, 2.6 * len(scores)), squeeze=False)
    removed = _removed_units(run.record.get("plan") or {})
    for ax, entry in zip(axes[:, 0], scores, strict=True):
        values, unit = entry["values"], entry.get("unit", "block")
        colors = ["tab:red" if (i, unit) in removed else "tab:gray" for i in range(len(values))]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_title(f"{run.name}: {entry.get('criterion', '?')} importance of each {unit}")
        ax.set_xlabel(f"{unit} index")
        ax.set_ylabel("score (higher = keep)")
        ax.legend(handles=_legend_patches(), loc="best", fontsize="small")
    return _save(fig, out / f"importance_{_slug(run.name)}.png")


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
    plan = record.get("expert_plan") or {}
    removed = {
        str(i): r for i, r in zip(plan.get("layers", []), plan.get("removed", []), strict=True)
    }
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

    return [Patch(color="tab:red", label="removed"), Patch(color="tab:gray", label="kept")]


def _removed_units(plan: dict[str, Any]) -> set[tuple[int, str]]:
    units = {(i, "block") for i in plan.get("blocks", [])}
    return units | {(i, k) for k in ("attn", "mlp") for i in plan.get(k, [])}


def plot_ppl_vs_params(runs: list[RunInfo], out: Path) -> Path | None:
    points = [(r, d, p) for r in runs if r.parameters for d, p in r.ppl().items()]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for dataset in sorted({d for _, d, _ in points}):
        series = sorted((r.parameters / 1e6, p, r.name) for r, d, p in points if d == dataset)
        ax.plot([s[0] for s in series], [s[1] for s in series], "o-", label=dataset)
        for x, y, name in series:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title("Perplexity vs parameters")
    ax.grid(alpha=0.3)
    ax.legend(title="dataset")
    return _save(fig, out / "ppl_vs_params.png")


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
    out.mkdir(parents=True, exist_ok=True)
    runs = load_runs(list(run_dirs))
    sections = [f"# {title}\n"]
    if runs:
        sections += _runs_section(runs, out)
    for path in bench_files:
        sections += _bench_section(path, out)
    page = out / "index.md"
    page.write_text("\n".join(sections) + "\n")
    log.info("Report written to %s", page)
    return page


def _runs_section(runs: list[RunInfo], out: Path) -> list[str]:
    lines = ["## Runs\n", runs_table(runs), ""]
    ppl_plot = plot_ppl_vs_params(runs, out)
    if ppl_plot:
        lines += ["## Perplexity vs parameters\n", f"![PPL vs parameters]({ppl_plot.name})", ""]
    importance = [p for p in (plot_importance(r, out) for r in runs) if p]
    if importance:
        lines += ["## Unit importance per criterion\n"]
        lines += [f"![importance]({p.name})\n" for p in importance]
    experts = [p for p in (plot_expert_usage(r, out) for r in runs) if p]
    if experts:
        lines += ["## Expert usage per MoE layer\n", *[f"![experts]({p.name})\n" for p in experts]]
    return lines


def _bench_section(path: Path, out: Path) -> list[str]:
    from secateurs.evaluate.efficiency import format_table

    if not path.is_file():
        raise ConfigError(f"Bench file {path} does not exist.")
    bench = json.loads(path.read_text())
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
