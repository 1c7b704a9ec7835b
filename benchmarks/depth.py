"""Depth pruning on SmolLM2-135M: anchors' selections, criteria, greedy and sub-block search.

Every selection is evaluated here, in one run, by the same eval: WikiText-2 and PTB perplexity
(seq_len 128, one BOS at the stream start, the first --max-windows windows of each), with and
without least-squares healing (``--heal``). Scoring runs in a fresh ``secateurs prune`` process
per method, so its time and peak memory are its own. Budgets: 6 and 10 of 30 blocks; the
sub-block search removes the same number of parameters (its 6-block row is the prefix of its
10-block search that fits the 6-block budget). The calibration seed spread scores one-shot
``ppl+`` at several seeds and sample counts.

    python benchmarks/depth.py --max-windows 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import markdown_table, run_measured, secateurs_cli, write_results  # noqa: E402

from secateurs.adapters import adapter_for  # noqa: E402
from secateurs.api import (
    CriterionSpec,
    ScoreResult,
    count_parameters,
    plan_from_scores,
    score_units,
)  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.defaults import HEAL_SAMPLES  # noqa: E402
from secateurs.depth_api import merge_branches  # noqa: E402
from secateurs.depth_search import unit_params  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.healing import heal_plan  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.plan import SL_PROTECTED, Plan, resolve_protected  # noqa: E402
from secateurs.surgery import apply_plan  # noqa: E402
from secateurs.units import Unit  # noqa: E402

ANCHORS = {
    "Shortened LLaMA (their code)": {
        6: (12, 13, 14, 16, 17, 18),
        10: (4, 5, 7, 12, 13, 14, 16, 17, 18, 26),
    },
    "ShortGPT (their selection)": {
        6: (13, 14, 15, 17, 25, 26),
        10: (3, 5, 12, 13, 14, 15, 16, 17, 25, 26),
    },
}
TIMING_KEYS = ("scoring_s", "scoring_cpu_s", "process_s", "peak_rss_mb")
METHODS = ["ppl+:iterative", "ppl+:subblock", "ppl+", "block-influence", "taylor+"]


def prune_in_fresh_process(args, folder: Path, name: str, *extra: str) -> tuple[dict, float, float]:
    out = folder / name
    seconds, peak_mb = run_measured(
        [
            *secateurs_cli(),
            "prune",
            args.model,
            *extra,
            "--out",
            str(out),
            "--overwrite",
            "--n-samples",
            str(args.n_samples),
            "--calib-seq-len",
            "128",
            "--seed",
            str(args.seed),
            "--data-dir",
            str(args.data_dir),
        ]
    )
    return json.loads((out / "secateurs.json").read_text()), seconds, peak_mb


def method_plans(method: str, args, folder: Path, dense) -> tuple[dict[int, Plan], dict]:
    """Plans for every budget from one scoring run of ``method``, and what it cost."""
    criterion, _, mode = method.partition(":")
    extra = ["--criterion", criterion, "--remove", str(max(args.budgets))]
    if mode == "iterative":
        extra += ["--iterative", "--shortlist", str(args.shortlist)]
    if mode == "subblock":
        extra += ["--unit", "subblock", "--shortlist", str(args.shortlist)]
    record, seconds, peak = prune_in_fresh_process(args, folder, method.replace(":", "-"), *extra)
    info = {
        "scoring_s": record["timings"]["scoring_s"],
        "scoring_cpu_s": record["timings"]["scoring_cpu_s"],
        "process_s": round(seconds, 1),
        "peak_rss_mb": round(peak),
        "scores": record["scores"],
        "search": record.get("search"),
    }
    num_layers = dense.config.num_hidden_layers
    if mode in ("iterative", "subblock"):
        order = [Unit(layer, kind) for layer, kind in record["search"]["order"]]
        return {n: prefix_plan(order, n, mode, dense, num_layers) for n in args.budgets}, info
    scores = ScoreResult.from_dict(record["scores"][0])
    protected = CriterionSpec.parse(criterion).protected
    return {n: plan_from_scores(scores, num_layers, n, protected) for n in args.budgets}, info


def prefix_plan(order: list[Unit], blocks: int, mode: str, dense, num_layers: int) -> Plan:
    """The first units of a greedy order within ``blocks`` blocks (or their parameters)."""
    if mode == "iterative":
        return Plan.of_units(num_layers, order[:blocks])
    adapter = adapter_for(dense)
    sizes = [unit_params(dense, adapter, Unit(i, "block")) for i in range(num_layers)]
    budget, spent, taken = blocks * sum(sizes) / num_layers, 0, []
    slack = min(unit_params(dense, adapter, Unit(0, k)) for k in ("attn", "mlp")) // 2
    for unit in order:
        cost = unit_params(dense, adapter, unit)
        if spent + cost > budget + slack:
            break
        taken.append(unit)
        spent += cost
    return Plan.of_units(num_layers, merge_branches(taken))


def evaluate(model, tokenizer, args) -> dict[str, float]:
    return {
        dataset: round(
            perplexity(
                model,
                tokenizer,
                PPLProtocol(dataset, max_windows=args.max_windows),
                args.data_dir,
                progress=False,
            ).ppl,
            3,
        )
        for dataset in ("wikitext2", "ptb")
    }


def describe(plan: Plan) -> str:
    parts = [" ".join(map(str, plan.blocks))]
    parts += [f"attn {' '.join(map(str, plan.attn))}" if plan.attn else ""]
    parts += [f"mlp {' '.join(map(str, plan.mlp))}" if plan.mlp else ""]
    return "; ".join(p for p in parts if p)


def plan_rows(method: str, plans: dict[int, Plan], info: dict, dense, tokenizer, heal_tokens, args):
    rows = []
    for count, plan in plans.items():
        for healed in (False, True) if args.heal else (False,):
            model = copy.deepcopy(dense)
            if healed:
                heal_plan(model, adapter_for(model), plan, heal_tokens)
            apply_plan(model, plan)
            row = {
                "method": method,
                "budget": count,
                "healed": healed,
                "params": count_parameters(model),
                **evaluate(model, tokenizer, args),
                "removed": describe(plan),
                **{k: v for k, v in info.items() if k in TIMING_KEYS},
            }
            rows.append(row)
            print({k: v for k, v in row.items()}, flush=True)
            del model
    return rows


def seed_spread(dense, tokenizer, args) -> list[dict]:
    """One-shot ppl+ selections and PPL at several calibration seeds and sample counts."""
    spread, seen = [], {}
    num_layers = dense.config.num_hidden_layers
    for n_samples in args.spread_sizes:
        for seed in args.spread_seeds:
            calib = CalibrationConfig(n_samples=n_samples, seed=seed)
            start = time.perf_counter()
            scores = score_units(
                dense, tokenizer, "ppl", calibration=calib, data_root=args.data_dir, progress=False
            )
            seconds = time.perf_counter() - start
            for count in args.budgets:
                plan = plan_from_scores(
                    scores, num_layers, count, resolve_protected(SL_PROTECTED, num_layers)
                )
                if plan.blocks not in seen:
                    seen[plan.blocks] = evaluate(
                        apply_plan(copy.deepcopy(dense), plan), tokenizer, args
                    )
                spread.append(
                    {
                        "n_samples": n_samples,
                        "seed": seed,
                        "budget": count,
                        "scoring_s": round(seconds, 1),
                        "removed": describe(plan),
                        **seen[plan.blocks],
                    }
                )
                print(spread[-1], flush=True)
    return spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budgets", default="6,10", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shortlist", type=int, default=3)
    parser.add_argument("--heal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--spread-seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    parser.add_argument(
        "--spread-sizes", default="10,32", type=lambda s: [int(x) for x in s.split(",") if x]
    )
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--only-spread", action="store_true", help="the seed spread alone")
    parser.add_argument("--name", default="depth", help="results/NAME.json and .md")
    args = parser.parse_args()
    if args.only_spread:
        dense, tokenizer = load_model(args.model)
        write_table([], seed_spread(dense, tokenizer, args), args)
        return
    torch.set_num_threads(1)
    dense, tokenizer = load_model(args.model)
    heal_tokens = CalibrationConfig(n_samples=HEAL_SAMPLES, seed=args.seed).load(
        tokenizer, args.data_dir
    )
    rows = [
        {
            "method": "dense",
            "budget": 0,
            "params": count_parameters(dense),
            **evaluate(dense, tokenizer, args),
        }
    ]
    print(rows[-1], flush=True)
    num_layers = dense.config.num_hidden_layers
    for name, selections in ANCHORS.items():
        plans = {n: Plan(num_layers, blocks=selections[n]) for n in args.budgets if n in selections}
        rows += plan_rows(name, plans, {}, dense, tokenizer, heal_tokens, args)
        write_table(rows, [], args)
    with tempfile.TemporaryDirectory() as folder:
        for method in [m for m in args.methods.split(",") if m]:
            plans, info = method_plans(method, args, Path(folder), dense)
            rows += plan_rows(method, plans, info, dense, tokenizer, heal_tokens, args)
            write_table(rows, [], args, {method: info})
    spread = seed_spread(dense, tokenizer, args) if args.spread_seeds else []
    write_table(rows, spread, args)


_DETAILS: dict[str, dict] = {}


def write_table(rows: list[dict], spread: list[dict], args, details: dict | None = None) -> None:
    _DETAILS.update(details or {})
    columns = [
        ("method", "selection"),
        ("budget", "blocks' worth"),
        ("healed", "healed"),
        ("params", "params"),
        ("wikitext2", "WikiText-2 PPL"),
        ("ptb", "PTB PPL"),
        ("scoring_s", "scoring s"),
        ("scoring_cpu_s", "scoring CPU s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("removed", "removed"),
    ]
    protocol = (
        f"SmolLM2-135M ({args.model}), seq_len 128, one BOS at the stream start, first "
        f"{args.max_windows} windows of WikiText-2 test and PTB validation; calibration: "
        f"{args.n_samples} C4 windows × 128 tokens, seed {args.seed}; healing fits on "
        f"{HEAL_SAMPLES} C4 windows; greedy searches re-score a shortlist of {args.shortlist} "
        "per step after the first. Scoring and evaluation in one run on one machine (1 thread)."
    )
    table = f"{protocol}\n\n" + (markdown_table(rows, columns) if rows else "")
    if spread:
        spread_columns = [
            ("n_samples", "calibration windows"),
            ("seed", "seed"),
            ("budget", "blocks"),
            ("removed", "removed"),
            ("wikitext2", "WikiText-2 PPL"),
            ("ptb", "PTB PPL"),
            ("scoring_s", "scoring s"),
        ]
        table += "\n\nOne-shot ppl+ over calibration seeds and sizes:\n\n" + markdown_table(
            spread, spread_columns
        )
    data = {
        "protocol": protocol,
        "args": vars(args),
        "rows": rows,
        "spread": spread,
        "methods": _DETAILS,
    }
    write_results(args.name, data, table)


if __name__ == "__main__":
    main()
