"""``secateurs eval ppl``: perplexity with the papers' protocol, of one model or several.

Several models are evaluated in one process (one start-up, data read once per model). A pruned
model given together with the dense model it came from (its record's ``source``) is compared
with it: a PPL far above the dense one gets a warning, and ``--save`` keeps the dense point in
the pruned run's ``results.json`` for ``secateurs report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from secateurs.commands.base import Command, register
from secateurs.commands.common import (
    add_data_args,
    add_model_args,
    add_save_arg,
    dense_of,
    print_json,
    save_dense,
    save_dirs,
)
from secateurs.report import FAR_ABOVE, ppl_warning

BOS_POLICIES = ("stream", "window", "none")  # as secateurs.evaluate.ppl (torch: imported later)


@register
class EvalPPL(Command):
    path = ("eval", "ppl")
    help = "perplexity on wikitext2 / ptb / c4 (non-overlapping windows, remainder dropped)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser, several=True)
        parser.add_argument(
            "--dataset", default="wikitext2", help="comma-separated: wikitext2,ptb,c4"
        )
        parser.add_argument("--split", default=None, help="default: the papers' split per dataset")
        parser.add_argument(
            "--seq-len", type=int, default=128, help="tokens per window (default: %(default)s)"
        )
        parser.add_argument(
            "--bos", default="stream", choices=BOS_POLICIES, help="BOS policy (default: stream)"
        )
        parser.add_argument(
            "--max-windows", type=int, default=None, help="evaluate at most N windows"
        )
        parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
        parser.add_argument("--json", action="store_true", help="print results as JSON")
        add_save_arg(parser, "ppl")
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.data import require_data

        models = [args.model] if isinstance(args.model, str) else list(args.model)
        datasets = [d.strip() for d in args.dataset.split(",") if d.strip()]
        saves = save_dirs(args, models)
        # cheap checks first (no torch yet): data reachable, windows within the positions
        require_data(f"eval ppl ({', '.join(datasets)})", args.data_dir)
        for model in models:
            _check_positions(model, args.seq_len)
        from secateurs.evaluate.ppl import PPLProtocol

        protocols = [
            PPLProtocol(d, args.split, args.seq_len, args.bos, args.max_windows, args.batch_size)
            for d in datasets
        ]
        runs = {model: _evaluate(model, protocols, args) for model in models}
        warnings = _warnings(runs)
        for message in warnings:
            print(f"warning: {message}", file=sys.stderr)
        for model, location in saves.items():
            _save(location, runs[model], _dense_of(model, runs), runs)
        _print(args, runs, warnings)
        return 0


def _check_positions(model: str, seq_len: int) -> None:
    """--seq-len against config.json, before the weights are read (local models)."""
    from secateurs.checkpoint import read_config_dict
    from secateurs.models import resolve_model
    from secateurs.positions import check_seq_len

    location = Path(resolve_model(model))
    if location.is_dir():
        check_seq_len(seq_len, read_config_dict(location), model)


def _evaluate(model: str, protocols: list, args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.checkpoint import read_record
    from secateurs.evaluate.ppl import perplexity
    from secateurs.models import load_model

    loaded, tokenizer = load_model(model, dtype=args.dtype, device=args.device)
    results = {
        p.dataset: perplexity(loaded, tokenizer, p, args.data_dir).to_dict() for p in protocols
    }
    parameters = sum({p.data_ptr(): p.numel() for p in loaded.parameters()}.values())
    del loaded  # one model in memory at a time
    record = read_record(model) if Path(model).is_dir() else {}
    source = record.get("source_model") or record.get("source")
    return {"results": results, "parameters": parameters, "source": source}


def _dense_of(model: str, runs: dict[str, dict]) -> str | None:
    """The evaluated model that ``model`` was pruned from (its record's ``source``), if given."""
    return dense_of(model, {name: run.get("source") for name, run in runs.items()})


def _warnings(runs: dict[str, dict]) -> list[str]:
    out = []
    for model, run in runs.items():
        dense = _dense_of(model, runs)
        if dense is None:
            continue
        for dataset, result in run["results"].items():
            base = runs[dense]["results"].get(dataset, {}).get("ppl")
            if base and result["ppl"] > FAR_ABOVE * base:
                out.append(ppl_warning(model, dataset, result["ppl"], dense, base))
    return out


def _save(location: Path, run: dict[str, Any], dense: str | None, runs: dict) -> None:
    """Merge this run's PPL (and its dense model's, for the report) into results.json."""
    from secateurs.report import read_results, save_results

    previous = read_results(location)
    save_results(location, "ppl", {**previous.get("ppl", {}), **run["results"]})
    save_results(location, "parameters", run["parameters"])
    if dense is not None:
        entry = previous.get("dense") or {}
        old = entry.get("ppl", {}) if entry.get("model") == dense else {}
        values = {"parameters": runs[dense]["parameters"], "ppl": {**old, **runs[dense]["results"]}}
        save_dense(location, dense, values)


def _print(args: argparse.Namespace, runs: dict[str, dict], warnings: list[str]) -> None:
    if args.json:
        if len(runs) == 1:
            model, run = next(iter(runs.items()))
            print_json({"model": model, "results": run["results"], "warnings": warnings})
        else:
            print_json(
                {"models": [{"model": m, **r} for m, r in runs.items()], "warnings": warnings}
            )
        return
    width = max(len("model"), *(len(m) for m in runs)) if len(runs) > 1 else 0
    head = f"{'model':<{width}} " if width else ""
    print(f"{head}{'dataset':<10} {'ppl':>12} {'windows':>9} {'tokens':>9}  protocol")
    for model, run in runs.items():
        for name, r in run["results"].items():
            p = r["protocol"]
            prefix = f"{model:<{width}} " if width else ""
            print(
                f"{prefix}{name:<10} {r['ppl']:>12.3f} {r['windows']:>9} {r['tokens']:>9}  "
                f"{p['split']}, seq_len={p['seq_len']}, bos={p['bos']}"
            )
