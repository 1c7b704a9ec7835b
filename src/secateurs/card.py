"""A Hugging Face model card (``README.md``) for every secateurs output, rendered from its files.

The card is a pure function of the run record (``secateurs.json``) and, when the model has been
evaluated, of ``results.json``: every number in it is read from those files, nothing is looked
up or estimated, and what a file does not hold (a command line, a measurement) is said to be
missing. ``write_card`` (re)writes it; ``secateurs.report.save_results`` calls it, so every
``eval ... --save`` keeps the card current.

Format: YAML front matter with the Hub's keys (``base_model``, ``library_name``,
``pipeline_tag``, ``tags``; https://huggingface.co/docs/hub/model-cards), then markdown.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError

log = logging.getLogger(__name__)

CARD_FILE = "README.md"
# First line after the front matter: marks the card as ours, so a card a person wrote (no mark)
# is never overwritten.
MARK = "<!-- secateurs model card: written from secateurs.json and results.json; edits are lost -->"

# The hub model behind each embedded alias (secateurs.models.ALIASES), and what was converted.
ALIAS_SOURCES = {
    "smollm2-135m": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "its Q4_1 GGUF (`SmolLM2-135M-Instruct.Q4_1.gguf`), dequantized by transformers",
    ),
}

# Record key -> (tag, words), per kind of removed unit, in card order.
DEPTH_KINDS = (
    ("blocks", "block", "blocks (whole decoder layers)"),
    ("attn", "attn", "attention branches"),
    ("mlp", "mlp", "MLP branches"),
)
WIDTH_KINDS = (("heads", "KV head groups"), ("channels", "MLP channels"))


# --- the card -----------------------------------------------------------------------------------


def render_card(
    record: dict[str, Any], results: dict[str, Any] | None = None, name: str = "this model"
) -> str:
    """The model card of a run: ``record`` is its ``secateurs.json``, ``results`` its
    ``results.json`` (None or empty: not evaluated yet), ``name`` its directory's name."""
    from secateurs.plan import Plan  # torch: not at import time

    plan = Plan.of_record(record)
    if plan is None:
        raise ConfigError("The record has no plan: it is not the record of a secateurs run.")
    sections = [
        _front_matter(record, plan),
        MARK,
        _title(record, plan, name),
        _removed_section(record, plan),
        _method_section(record, plan),
        _parameters_section(record),
        _results_section(results or {}),
        _recovery_section(record),
        _loading_section(record, name),
        _reproduce_section(record, name),
        _versions_section(record),
    ]
    return "\n\n".join(s.strip() for s in sections if s) + "\n"


def write_card(directory: str | os.PathLike, name: str | None = None) -> Path | None:
    """(Re)write ``directory/README.md`` atomically from its ``secateurs.json`` and
    ``results.json``; return its path. ``name``: the model's name in the card (default: the
    directory's; give the final one when ``directory`` is a temporary sibling being filled).
    A README.md without our mark is a person's card: it is kept (with a warning), None returned."""
    from secateurs.checkpoint import RECORD_FILE

    folder = Path(directory)
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        raise ConfigError(f"{folder} has no {RECORD_FILE}: not the output of a secateurs run.")
    card = folder / CARD_FILE
    if card.is_file() and MARK not in card.read_text(encoding="utf-8", errors="replace"):
        log.warning("%s was not written by secateurs; it is kept as it is", card)
        return None
    results = _read_json(folder / "results.json")
    text = render_card(_read_json(record_path), results, name or folder.name)
    _write_text(card, text)
    return card


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); the model card needs it.") from err


def _write_text(path: Path, text: str) -> None:
    """Atomic: a reader sees the old card or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- front matter and title ---------------------------------------------------------------------


def base_model(source: str | None) -> tuple[str | None, str]:
    """(hub id for ``base_model`` or None, how to name the source in words)."""
    if not source:
        return None, "an unrecorded model"
    if source.lower() in ALIAS_SOURCES:
        hub_id, what = ALIAS_SOURCES[source.lower()]
        return hub_id, f"[{hub_id}](https://huggingface.co/{hub_id}) ({what}; alias `{source}`)"
    if _is_hub_id(source):
        return source, f"[{source}](https://huggingface.co/{source})"
    return None, f"the local model `{source}`"


def _is_hub_id(text: str) -> bool:
    """ "org/name" (or "name") that is not a path on this machine."""
    parts = text.split("/")
    return (
        len(parts) <= 2
        and all(parts)
        and not text.startswith((".", "~"))
        and not Path(text).expanduser().exists()
        and not text.endswith(".gguf")
    )


def tags(record: dict[str, Any], plan: Any) -> list[str]:
    """``pruned``, ``secateurs``, the parts (depth / width / experts) and the unit kinds."""
    kinds = [tag for key, tag, _ in DEPTH_KINDS if getattr(plan, key)]
    kinds += [kind for kind, _ in WIDTH_KINDS if any(plan.removed(kind))]
    kinds += ["experts"] if plan.has_experts else []
    return list(dict.fromkeys(["pruned", "secateurs", *plan.parts, *kinds]))


def _front_matter(record: dict[str, Any], plan: Any) -> str:
    import yaml

    hub_id, _ = base_model(record.get("source_model"))
    meta: dict[str, Any] = {"base_model": hub_id} if hub_id else {}
    meta.update(
        library_name="transformers", pipeline_tag="text-generation", tags=tags(record, plan)
    )
    return f"---\n{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)}---"


def _title(record: dict[str, Any], plan: Any, name: str) -> str:
    _, source = base_model(record.get("source_model"))
    params = record.get("parameters") or {}
    when = str(record.get("created", ""))[:10]
    lines = [
        f"# {name}",
        f"A structurally pruned copy of {source}: {summary(plan)} removed, "
        f"{_count(params.get('before'))} → {_count(params.get('after'))} parameters"
        f"{_fewer(params)}.",
        f"Made by secateurs {record.get('secateurs_version', '?')}"
        + (f" on {when}" if when else "")
        + ("; then retrained (see Recovery)." if record.get("recovery") else "; not retrained."),
    ]
    return "\n\n".join(lines)


def summary(plan: Any) -> str:
    """What a plan removes, in a phrase: "blocks 13, 14; 120 MLP channels in 30 layers"."""
    parts = [
        f"{words.split(' (')[0]} {_layers(getattr(plan, key))}"
        for key, _, words in DEPTH_KINDS
        if getattr(plan, key)
    ]
    for kind, words in (*WIDTH_KINDS, ("experts", "routed experts")):
        removed = plan.removed(kind)
        if any(removed):
            layers = sum(1 for units in removed if units)
            parts.append(f"{sum(map(len, removed)):,} {words} in {layers} layers")
    return "; ".join(parts) or "nothing"


def _fewer(params: dict[str, Any]) -> str:
    before, after = params.get("before"), params.get("after")
    if not before or after is None:
        return ""
    return f", {100 * (before - after) / before:.1f}% fewer"


# --- what was removed ---------------------------------------------------------------------------


def _removed_section(record: dict[str, Any], plan: Any) -> str:
    out = ["## What was removed", f"The source has {plan.num_layers} decoder layers."]
    if plan.has_depth:
        out.append(_depth_table(plan))
    if plan.has_widths:
        out.append(_width_table(record, plan))
    if plan.has_experts:
        out.append(_experts_table(plan))
    out.append(_pipeline_note(record))
    return "\n\n".join(s for s in out if s)


def _depth_table(plan: Any) -> str:
    rows = ["| removed | layers (original indices) | count |", "|---|---|---:|"]
    for key, _, words in DEPTH_KINDS:
        layers = getattr(plan, key)
        if layers:
            rows.append(f"| {words} | {_layers(layers)} | {len(layers)} |")
    return "\n".join(rows)


def _width_table(record: dict[str, Any], plan: Any) -> str:
    """Kept / original per layer, consecutive layers with equal cells merged into one row."""
    cells = []
    for layer in range(plan.num_layers):
        if layer in plan.blocks:
            cells.append(("removed (block)", "removed (block)"))
            continue
        cells.append(tuple(_kept_cell(plan, kind, layer) for kind, _ in WIDTH_KINDS))
    rows = ["| layers | KV head groups kept | MLP channels kept |", "|---|---:|---:|"]
    rows += [f"| {span} | {a} | {b} |" for span, (a, b) in _runs(cells)]
    note = (
        "Per-layer counts as kept / before; 'all' where that kind was not pruned. "
        "Query heads go with their KV group."
    )
    return "\n".join(rows) + "\n\n" + note


def _kept_cell(plan: Any, kind: str, layer: int) -> str:
    total = getattr(plan, f"num_{kind}")[layer] if getattr(plan, f"num_{kind}") else 0
    if kind == "heads" and layer in plan.attn:
        return "removed (attention branch)"
    if kind == "channels" and layer in plan.mlp:
        return "removed (MLP branch)"
    if not total:
        return "all"
    return f"{total - len(plan.removed(kind)[layer]):,} / {total:,}"


def _experts_table(plan: Any) -> str:
    cells = []
    for layer in range(plan.num_layers):
        total = plan.num_experts[layer]
        if not total:
            cells.append(("dense layer",))
        elif layer in plan.blocks or layer in plan.mlp:
            cells.append(("removed",))
        else:
            cells.append((f"{total - len(plan.experts[layer])} / {total}",))
    rows = ["| layers | routed experts kept |", "|---|---:|"]
    rows += [f"| {span} | {cell} |" for span, (cell,) in _runs(cells)]
    note = (
        f"The router still picks the top {plan.top_k} per token; shared experts (in models "
        "that have them) are kept whole."
    )
    return "\n".join(rows) + "\n\n" + note


def _runs(cells: list[tuple]) -> list[tuple[str, tuple]]:
    """Consecutive layers with equal cells as ("3–7", cells) rows."""
    out: list[tuple[str, tuple]] = []
    start = 0
    for layer in range(1, len(cells) + 1):
        if layer == len(cells) or cells[layer] != cells[start]:
            span = str(start) if layer - 1 == start else f"{start}–{layer - 1}"
            out.append((span, cells[start]))
            start = layer
    return out


def _pipeline_note(record: dict[str, Any]) -> str:
    pipeline = record.get("pipeline") or {}
    if record.get("streamed") and not pipeline:
        return "Written by streaming: the kept tensors were copied without loading the model."
    if pipeline.get("name") == "sequential":
        return (
            "Pruned layer by layer from disk (`--sequential`): "
            f"compute dtype {pipeline.get('compute_dtype', '?')}, "
            f"device {pipeline.get('device', '?')}, batch size {pipeline.get('batch_size', '?')}."
        )
    return ""


# --- how it was chosen --------------------------------------------------------------------------


def _method_section(record: dict[str, Any], plan: Any) -> str:
    criterion = record.get("criterion") or {}
    lines = ["## How the units were chosen"]
    if criterion.get("block") or criterion.get("width"):  # --unit block,width
        lines.append(f"- depth: {_criterion_line(criterion.get('block') or {}, plan)}")
        lines.append(f"- width: {_criterion_line(criterion.get('width') or {}, plan)}")
    else:
        lines.append(f"- criterion: {_criterion_line(criterion, plan)}")
    lines += _search_lines(record)
    lines += _width_lines(record)
    lines += _expert_lines(record)
    lines.append(f"- calibration: {_calibration(record.get('calibration'))}")
    return "\n".join(lines)


def _criterion_line(criterion: dict[str, Any], plan: Any) -> str:
    name = criterion.get("name", "?")
    text = f"`{name}`"
    if name == "explicit":
        text = "none: the units were given explicitly (`--blocks` / `--plan`)"
    options = criterion.get("options") or {}
    if options:
        text += " with options " + ", ".join(f"`{k}={_value(v)}`" for k, v in options.items())
    if criterion.get("iterative"):
        text += "; iterative (re-scored after each removal)"
    protected = criterion.get("protected", plan.protected)
    if protected:
        text += f"; protected layers (never removed): {_layers(protected)}"
        if tuple(protected) == _sl_protected(plan.num_layers):
            text += " (Shortened LLaMA's set, the `+` of `NAME+` criteria)"
    return text


def _sl_protected(num_layers: int) -> tuple[int, ...]:
    from secateurs.plan import SL_PROTECTED, resolve_protected

    return resolve_protected(SL_PROTECTED, num_layers) if num_layers >= 6 else ()


def _search_lines(record: dict[str, Any]) -> list[str]:
    lines = []
    search = record.get("search") or {}
    if search.get("layers"):  # --unit auto: every layer's form chosen together
        lines.append(_joint_line(search))
    elif search:
        objective = (search.get("objective") or {}).get("objective", "?")
        lines.append(
            f"- search: greedy, objective `{objective}`, shortlist {search.get('shortlist')}; "
            "order of removal: " + ", ".join(f"{u[1]} {u[0]}" for u in search.get("order", []))
        )
    healing = record.get("healing") or {}
    for run in healing.get("runs", []):
        lines.append(
            f"- healing ({healing.get('method', '?')}, target "
            f"`{healing.get('target', '?')}`, {healing.get('samples', '?')} windows): "
            + _heal_run(run)
        )
    return lines


def _joint_line(search: dict[str, Any]) -> str:
    budget = search.get("budget") or {}
    latency = search.get("latency") or {}
    goal = (
        f"{latency.get('fraction')}× the dense model's {latency.get('engine')} "
        f"{latency.get('metric')} latency"
        if latency
        else f"{budget.get('value'):,} parameters"
    )
    windows = search.get("windows") or {}
    return (
        f"- search: {search.get('kind', 'evolutionary')}, budget {goal}; "
        f"{len(search.get('history', [])) - 1} generations, {search.get('evaluations')} "
        f"candidates judged on {windows.get('judge')} windows (variants fitted on "
        f"{windows.get('fit')} others); predicted KL from dense {search.get('predicted_kl'):.4f}"
    )


def _heal_run(run: dict[str, Any]) -> str:
    """One healed span: whole blocks ``[first, last]``, or the ``sublayers`` of a mixed run."""
    if run.get("sublayers"):
        span = ", ".join(f"{kind} {layer}" for layer, kind in run["sublayers"])
    else:
        first, last = run["blocks"]
        span = f"block {first}" if first == last else f"blocks {first}–{last}"
    if run.get("skipped"):
        return f"{span} not healed ({run['skipped']})"
    return (
        f"{span} replaced by a linear correction folded into layer {run['into_layer']}; "
        f"squared error on the calibration windows {_error(run['error_before'])} → "
        f"{_error(run['error_after'])}"
    )


def _error(value: float) -> str:
    return f"{value:,.4f}" if abs(value) < 1000 else f"{value:,.1f}"


def _width_lines(record: dict[str, Any]) -> list[str]:
    width = record.get("width") or {}
    if not width:
        return []
    params = record.get("parameters") or {}
    counted = "including" if width.get("include_embeddings") else "excluding"
    lines = [
        f"- width budget: {_percent(width.get('ratio'))} of the parameters {counted} embeddings"
        f" ({_count(params.get('base'))} counted), allocation `{width.get('allocation', '?')}`"
        + (f", layers {width['layers']}" if width.get("layers") else "")
    ]
    if record.get("allocation_rule"):
        lines.append(f"- allocation rule: {record['allocation_rule']}")
    recon = record.get("reconstruction") or {}
    if recon.get("enabled"):
        lines.append(
            f"- reconstruction: {recon.get('method', '?')}, damping {recon.get('damping')}, "
            f"{recon.get('samples')} windows"
        )
    elif recon:
        lines.append("- reconstruction: off")
    return lines


def _expert_lines(record: dict[str, Any]) -> list[str]:
    experts = record.get("experts") or {}
    if not experts:
        return []
    amount = (
        f"{experts['remove']} per MoE layer"
        if experts.get("remove") is not None
        else f"{_percent(experts.get('ratio'))} of the routed experts"
    )
    return [f"- experts: {amount}, allocation `{experts.get('allocation', '?')}`"]


def _calibration(calibration: dict[str, Any] | None) -> str:
    if not calibration:
        return "none (the criterion reads the weights only)"
    parts = [f"`{calibration.get('source', '?')}`,"]
    if calibration.get("n_samples") is not None:
        parts.append(f"{calibration['n_samples']} windows")
    if calibration.get("seq_len") is not None:
        parts.append(f"of {calibration['seq_len']} tokens")
    text = " ".join(parts)
    if calibration.get("seed") is not None:
        text += f", seed {calibration['seed']}"
    return text


# --- parameters and results ---------------------------------------------------------------------


def _parameters_section(record: dict[str, Any]) -> str:
    params = record.get("parameters") or {}
    before, after = params.get("before"), params.get("after")
    rows = ["## Parameters", "| | parameters |", "|---|---:|"]
    rows += [f"| before | {_count(before)} |", f"| after | {_count(after)} |"]
    if before is not None and after is not None:
        rows.append(f"| removed | {_count(before - after)} |")
    for key, words in (("removed_by_depth", "by depth"), ("removed_by_width", "by width")):
        if params.get(key) is not None:
            rows.append(f"| removed {words} | {_count(params[key])} |")
    if params.get("asked_ratio") is not None:
        rows.append(
            f"\nAsked {_percent(params['asked_ratio'])}, removed "
            f"{_percent(params.get('achieved_ratio'))} of the {_count(params.get('base'))} "
            "parameters counted by the budget."
        )
    return "\n".join(rows)


def _results_section(results: dict[str, Any]) -> str:
    if not results:
        return (
            "## Results\n\nNot evaluated yet: `secateurs eval ppl SOURCE DIR --save`, "
            "`eval zeroshot DIR --save` and `eval generate SOURCE DIR --save` add their "
            "measurements here."
        )
    parts = ["## Results"]
    parts += [_ppl_table(results), _zeroshot_table(results.get("zeroshot") or {})]
    parts += [_speed_table(results.get("speed") or {}), _generations_table(results)]
    return "\n\n".join(p for p in parts if p)


def _ppl_table(results: dict[str, Any]) -> str:
    ppl = results.get("ppl") or {}
    if not ppl:
        return ""
    dense = (results.get("dense") or {}).get("ppl") or {}
    name = (results.get("dense") or {}).get("model")
    head = "| dataset | PPL | " + (f"dense PPL ({name}) | " if dense else "")
    rows = [head + "windows | tokens | protocol |", "|---|---:|" + ("---:|" if dense else "")]
    rows[-1] += "---:|---:|---|"
    for dataset, value in ppl.items():
        entry = value if isinstance(value, dict) else {"ppl": value}
        base = _ppl_of(dense.get(dataset))
        rows.append(
            f"| {dataset} | {entry['ppl']:,.2f} | "
            + (f"{base:,.2f} | " if dense and base is not None else ("– | " if dense else ""))
            + f"{_count(entry.get('windows'))} | {_count(entry.get('tokens'))} | "
            f"{_protocol(entry.get('protocol') or {})} |"
        )
    return "Perplexity (exp of the mean next-token NLL over non-overlapping windows):\n\n" + (
        "\n".join(rows)
    )


def _ppl_of(value: Any) -> float | None:
    if value is None:
        return None
    return float(value["ppl"] if isinstance(value, dict) else value)


def _protocol(protocol: dict[str, Any]) -> str:
    keys = ("split", "seq_len", "bos", "max_windows")
    return ", ".join(f"{k} {protocol[k]}" for k in keys if protocol.get(k) is not None) or "–"


def _zeroshot_table(zeroshot: dict[str, Any]) -> str:
    scores = zeroshot.get("scores") or {}
    if not scores:
        return ""
    protocol = zeroshot.get("protocol") or {}
    metric = protocol.get("metric") or {}
    samples = zeroshot.get("samples") or {}
    rows = ["| task | metric | value | documents |", "|---|---|---:|---:|"]
    for task, value in scores.items():
        rows.append(
            f"| {task} | {metric.get(task, '?')} | {value:.4f} | {samples.get(task, '–')} |"
        )
        extra = (zeroshot.get("metrics") or {}).get(task, {}).get("perplexity")
        if extra is not None:  # LAMBADA: the target's perplexity beside its accuracy
            rows.append(f"| {task} | perplexity | {extra:,.2f} | {samples.get(task, '–')} |")
    if zeroshot.get("mean") is not None:
        rows.append(f"| **mean** | | **{zeroshot['mean']:.4f}** | |")
    limit = protocol.get("limit")
    how = f"at most {limit} documents per task" if limit else "full splits"
    source = protocol.get("source", "?")
    harness = protocol.get("harness", "lm-eval")
    return f"Zero-shot ({harness}, {how}, data {source}):\n\n" + "\n".join(rows)


def _speed_table(speed: dict[str, Any]) -> str:
    rows_in = (speed.get("model") or {}).get("results") or []
    if not rows_in:
        return ""
    protocol = speed.get("protocol") or {}
    baseline = (speed.get("model") or {}).get("baseline")
    rows = ["| batch | latency (s) | tokens/s | speedup |", "|---:|---:|---:|---:|"]
    for row in rows_in:
        rows.append(
            f"| {row.get('batch_size')} | {_fixed(row.get('latency_s'), 3)} | "
            f"{_fixed(row.get('throughput_tok_s'), 1)} | {_fixed(row.get('speedup'), 2)} |"
        )
    how = (
        f"{protocol.get('new_tokens', '?')} new tokens after {protocol.get('prompt_len', '?')} "
        f"prompt tokens, {protocol.get('device', '?')}, {protocol.get('threads', '?')} threads, "
        f"median of {protocol.get('repeats', '?')}; speedup against {baseline}"
    )
    return f"Speed (`secateurs bench`: {how}):\n\n" + "\n".join(rows)


def _generations_table(results: dict[str, Any]) -> str:
    from secateurs.evaluate.generate import side_by_side

    table = side_by_side(results)
    return f"Greedy generations:\n\n{table}" if table else ""


def _recovery_section(record: dict[str, Any]) -> str:
    recovery = record.get("recovery") or {}
    if not recovery:
        return ""
    data = recovery.get("data") or {}
    return (
        f"## Recovery\n\nRetrained after pruning: `{recovery.get('method', '?')}` on "
        f"`{data.get('source', '?')}`, {_count(recovery.get('tokens_seen'))} tokens"
        + (f", teacher `{recovery['teacher']}`" if recovery.get("teacher") else "")
        + "."
    )


# --- loading, reproducing -----------------------------------------------------------------------


def _loading_section(record: dict[str, Any], name: str) -> str:
    loading = record.get("loading") or {}
    plain = loading.get("plain_transformers", True)
    if plain:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{name}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")'
        )
    else:
        code = f'import secateurs\n\nmodel, tokenizer = secateurs.load_model("{name}")'
    parts = ["## How to load it", loading.get("how", ""), f"```python\n{code}\n```"]
    parts.append(_engines_table(record.get("engines") or {}, name))
    return "\n\n".join(p for p in parts if p)


def _engines_table(engines: dict[str, Any], name: str) -> str:
    if not engines:
        return ""
    if "error" in engines:
        return f"Exports: none ({engines['error']})"
    rows = ["| export | loads in |", "|---|---|"]
    for kind, entry in engines.items():
        command = f"`secateurs export {name} --to {kind} --out OUT`"
        where = (
            ", ".join(entry.get("engines", []))
            if entry.get("expressible")
            else f"not possible: {entry.get('why', '?')}"
        )
        rows.append(f"| {command} | {where} |")
    return "For serving engines, export it:\n\n" + "\n".join(rows)


def _reproduce_section(record: dict[str, Any], name: str) -> str:
    command = record.get("command")
    parts = ["## Reproduce"]
    if command:
        text = (
            shlex.join(command)
            if isinstance(command, Sequence) and not isinstance(command, str)
            else str(command)
        )
        parts.append(f"The command that made it:\n\n```bash\n{text}\n```")
    else:
        source = record.get("source_model") or "SOURCE"
        parts.append(
            "This record holds no command line (secateurs "
            f"{record.get('secateurs_version', '?')} did not record it), so the exact command is "
            f"unknown. `secateurs prune {shlex.quote(source)} --plan {shlex.quote(name)}/"
            "secateurs.json --out OUT` removes the same units; it does not repeat the scoring, "
            "healing or reconstruction."
        )
    if record.get("spec"):
        import yaml

        spec = yaml.safe_dump(record["spec"], sort_keys=False, allow_unicode=True)
        parts.append(f"The resolved specification:\n\n```yaml\n{spec.strip()}\n```")
    return "\n\n".join(parts)


def _versions_section(record: dict[str, Any]) -> str:
    timings = record.get("timings") or {}
    versions = record.get("versions") or {}
    lines = ["## Run"]
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if timings:
        lines.append("- timings: " + ", ".join(_timing(k, v) for k, v in timings.items()))
    lines.append("- full record: `secateurs.json` in this directory")
    return "\n".join(lines)


def _timing(key: str, value: Any) -> str:
    for suffix, unit in (("_s", "s"), ("_mb", "MB")):
        if key.endswith(suffix) and isinstance(value, (int, float)):
            return f"{key.removesuffix(suffix).replace('_', ' ')} {value:,.2f} {unit}"
    return f"{key.replace('_', ' ')} {value}"


# --- formatting ---------------------------------------------------------------------------------


def _layers(indices: Sequence[int]) -> str:
    return ", ".join(str(i) for i in indices)


def _count(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}"


def _percent(value: Any) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}%"


def _fixed(value: Any, digits: int) -> str:
    return "–" if value is None else f"{float(value):,.{digits}f}"


def _value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value
