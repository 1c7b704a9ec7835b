"""Depth pruning on SmolLM2-135M: every criterion at 6 and 10 of 30 blocks removed.

Scores are computed once per criterion in a fresh process (so its peak memory is its own),
then each plan is applied to a copy of the dense model and evaluated on WikiText-2 and PTB
(seq_len 128, stream BOS, the first --max-windows windows of each test set).

    python benchmarks/depth.py --max-windows 128
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import markdown_table, run_measured, secateurs_cli, write_results  # noqa: E402

from secateurs.api import CriterionSpec, ScoreResult, count_parameters, plan_from_scores  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.plan import Plan  # noqa: E402
from secateurs.surgery import apply_plan  # noqa: E402

CRITERIA = [
    "ppl",
    "ppl+",
    "taylor",
    "taylor+",
    "magnitude+",
    "block-influence",
    "block-influence+",
    "ppl+:iterative",
    "block-influence+:iterative",
]


def run_block_command(command: str, model: str, criterion: str, out: Path, args, *extra: str):
    """Run ``secateurs COMMAND`` on blocks with the benchmark's calibration, measured."""
    return run_measured([
        *secateurs_cli(), command, model, "--unit", "block", "--criterion", criterion,
        *extra, "--out", str(out), "--overwrite", "--n-samples", str(args.n_samples),
        "--calib-seq-len", "128", "--seed", str(args.seed),
    ])  # fmt: skip


def score_in_fresh_process(
    model: str, criterion: str, folder: Path, args
) -> tuple[ScoreResult, float, float]:
    out = folder / f"{criterion.replace('+', '_plus')}.json"
    seconds, peak_mb = run_block_command("score", model, criterion, out, args)
    return ScoreResult.from_dict(json.loads(out.read_text())), seconds, peak_mb


def iterative_order(model: str, criterion: str, count: int, folder: Path, args):
    """Greedy removal order of ``count`` blocks (re-scoring after each), in a fresh process.

    Greedy steps 1..k are the same for any total ≥ k, so one run serves every removal count.
    """
    out = folder / f"{criterion.replace('+', '_plus')}-iterative"
    extra = ("--iterative", "--remove", str(count))
    seconds, peak_mb = run_block_command("prune", model, criterion, out, args, *extra)
    record = json.loads((out / "secateurs.json").read_text())
    order = [layer for layer, _ in record["scores"][-1]["removed_before"]]
    order += [b for b in record["plan"]["blocks"] if b not in order]
    scoring_s = sum(step["seconds"] for step in record["scores"])
    return order, scoring_s, seconds, peak_mb


def evaluate(model, tokenizer, args) -> dict[str, float]:
    return {
        dataset: perplexity(
            model, tokenizer, PPLProtocol(dataset, max_windows=args.max_windows), progress=False
        ).ppl
        for dataset in ("wikitext2", "ptb")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--removals", default="6,10")
    parser.add_argument("--criteria", default=",".join(CRITERIA))
    parser.add_argument("--max-windows", type=int, default=128)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dense, tokenizer = load_model(args.model)
    num_layers = dense.config.num_hidden_layers
    rows = [
        {
            "method": "dense",
            "removed": 0,
            "params": count_parameters(dense),
            **evaluate(dense, tokenizer, args),
        }
    ]
    print(rows[-1], flush=True)
    removals = [int(n) for n in args.removals.split(",")]
    scored: dict[str, tuple[ScoreResult, float, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for method in args.criteria.split(","):
            criterion, _, mode = method.partition(":")
            spec = CriterionSpec.parse(criterion)
            if mode == "iterative":
                order, scoring_s, seconds, peak = iterative_order(
                    args.model, criterion, max(removals), Path(folder), args
                )
                plans = {n: Plan(num_layers, blocks=order[:n]) for n in removals}
                values = None
            else:  # NAME and NAME+ share scores; "+" only changes the selection
                if criterion.rstrip("+") not in scored:
                    scored[criterion.rstrip("+")] = score_in_fresh_process(
                        args.model, criterion, Path(folder), args
                    )
                scores, seconds, peak = scored[criterion.rstrip("+")]
                plans = {
                    n: plan_from_scores(scores, num_layers, n, spec.protected) for n in removals
                }
                scoring_s, values = scores.seconds, list(scores.values)
            for count, plan in plans.items():
                pruned = apply_plan(copy.deepcopy(dense), plan)
                rows.append(
                    {
                        "method": method,
                        "removed": count,
                        "params": count_parameters(pruned),
                        **evaluate(pruned, tokenizer, args),
                        "blocks": " ".join(map(str, plan.blocks)),
                        "scoring_s": round(scoring_s, 1),
                        "process_s": round(seconds, 1),
                        "peak_rss_mb": round(peak),
                        "scores": values,
                    }
                )
                print({k: v for k, v in rows[-1].items() if k != "scores"}, flush=True)
                del pruned
            write_table(rows, args)  # after every method, so a cut-short run keeps its rows


def write_table(rows: list[dict], args) -> None:
    columns = [
        ("method", "criterion"),
        ("removed", "blocks removed"),
        ("params", "params"),
        ("wikitext2", "WikiText-2 PPL"),
        ("ptb", "PTB PPL"),
        ("scoring_s", "scoring s"),
        ("peak_rss_mb", "scoring peak RSS MB"),
        ("blocks", "removed blocks"),
    ]
    protocol = (
        f"SmolLM2-135M ({args.model}), seq_len 128, stream BOS, first {args.max_windows} "
        f"windows per test set; calibration: {args.n_samples} C4 samples × 128 tokens, "
        f"seed {args.seed}."
    )
    table = f"{protocol}\n\n" + markdown_table(rows, columns)
    write_results("depth", {"protocol": protocol, "args": vars(args), "rows": rows}, table)


if __name__ == "__main__":
    main()
