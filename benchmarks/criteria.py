"""Width criteria side by side on SmolLM2-135M (the headline of the seed papers).

Every criterion scores heads and channels once, in a fresh process whose peak RSS is its own;
a fresh process running one plain inference pass over the same calibration batches gives the
memory reference. Each score set is then allocated (uniform / global) at each ratio of the
non-embedding parameters, cut from a copy of the dense model and evaluated without retraining.

    python benchmarks/criteria.py --max-windows 64
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import markdown_table, run_measured, write_results  # noqa: E402

from secateurs.adapters import adapter_for  # noqa: E402
from secateurs.api import count_parameters  # noqa: E402
from secateurs.criteria import CRITERIA, ScoringContext  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.width_api import WidthOptions, _plan, apply_width_plan, parameter_base  # noqa: E402

CRITERIA_NAMES = [
    "magnitude",
    "activation",
    "taylor",
    "fluctuation",
    "mini-llm",
    "hywia",
    "influence",
]
KINDS = ("heads", "channels")


def calibration(tokenizer, args) -> torch.Tensor:
    return CalibrationConfig("c4", args.n_samples, 128, args.seed).load(tokenizer)


def score_one(args) -> None:
    """Child process: score with one criterion and save the scores (no evaluation here)."""
    model, tokenizer = load_model(args.model)
    ctx = ScoringContext(model, adapter_for(model), calibration(tokenizer, args), 1, progress=False)
    scorer = CRITERIA.get(args.score_one)()
    start = time.perf_counter()
    scores = {kind: scorer.score_width(ctx, kind) for kind in KINDS}
    seconds = time.perf_counter() - start
    extras = {k: v for k, v in ctx.extras.items() if k == "input_mean"}
    torch.save({"scores": scores, "seconds": seconds, "extras": extras}, args.out)


@torch.no_grad()
def inference_one(args) -> None:
    """Child process: the memory reference, one plain forward per calibration batch."""
    model, tokenizer = load_model(args.model)
    for batch in calibration(tokenizer, args).split(1):
        model(input_ids=batch, use_cache=False)


def child(args, flag: str, value: str, out: Path) -> tuple[float, float]:
    command = [
        sys.executable,
        __file__,
        flag,
        value,
        "--out",
        str(out),
        "--model",
        args.model,
        "--n-samples",
        str(args.n_samples),
        "--seed",
        str(args.seed),
    ]
    return run_measured(command)


def evaluate(model, tokenizer, args) -> dict[str, float]:
    protocol = lambda name: PPLProtocol(name, max_windows=args.max_windows)  # noqa: E731
    return {
        n: perplexity(model, tokenizer, protocol(n), progress=False).ppl
        for n in ("wikitext2", "ptb")
    }


def prune_copy(dense, scored: dict, criterion: str, ratio: float, allocation: str):
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    opts = WidthOptions("width", ratio, allocation)
    target = round(ratio * parameter_base(model, False))
    scorer = CRITERIA.get(criterion)()
    layers = opts.layer_range(adapter.num_layers(model))
    plan = _plan(model, adapter, scored["scores"], opts, layers, target, scorer)
    apply_width_plan(model, plan, adapter, scored["extras"].get("input_mean"))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--criteria", default=",".join(CRITERIA_NAMES))
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--allocations", default="uniform,global")
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--score-one", help=argparse.SUPPRESS)
    parser.add_argument("--inference-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_one:
        return score_one(args)
    if args.inference_one:
        return inference_one(args)
    run(args)


def run(args) -> None:
    dense, tokenizer = load_model(args.model)
    base = parameter_base(dense, False)
    rows = [
        {
            "criterion": "dense",
            "params": count_parameters(dense),
            **evaluate(dense, tokenizer, args),
        }
    ]
    with tempfile.TemporaryDirectory() as folder:
        _, reference_mb = child(args, "--inference-one", "1", Path(folder) / "none")
        for name in args.criteria.split(","):
            out = Path(folder) / f"{name}.pt"
            wall, peak = child(args, "--score-one", name, out)
            scored = torch.load(out, weights_only=False)
            for ratio in map(float, args.ratios.split(",")):
                for allocation in args.allocations.split(","):
                    model = prune_copy(dense, scored, name, ratio, allocation)
                    params = count_parameters(model)
                    rows.append(
                        {
                            "criterion": name,
                            "allocation": allocation,
                            "ratio": ratio,
                            "achieved": round((rows[0]["params"] - params) / base, 4),
                            "params": params,
                            **evaluate(model, tokenizer, args),
                            "scoring_s": round(scored["seconds"], 1),
                            "peak_rss_mb": round(peak),
                            "vs_inference": round(peak / reference_mb, 3),
                            "backprop": CRITERIA.get(name).uses_backward,
                        }
                    )
                    print(rows[-1], flush=True)
    columns = [
        ("criterion", "criterion"),
        ("allocation", "allocation"),
        ("ratio", "ratio"),
        ("achieved", "achieved"),
        ("params", "params"),
        ("wikitext2", "WikiText-2 PPL"),
        ("ptb", "PTB PPL"),
        ("scoring_s", "scoring s"),
        ("peak_rss_mb", "scoring peak RSS MB"),
        ("vs_inference", "× inference RSS"),
        ("backprop", "backprop"),
    ]
    protocol = (
        f"SmolLM2-135M, width (heads + channels), ratio of non-embedding parameters, no "
        f"retraining; seq_len 128, first {args.max_windows} windows per test set; "
        f"calibration {args.n_samples} C4 × 128 tokens, seed {args.seed}; inference "
        f"reference peak RSS {reference_mb:.0f} MB (fresh process, same batches)."
    )
    write_results(
        "criteria",
        {"protocol": protocol, "reference_mb": reference_mb, "rows": rows},
        f"{protocol}\n\n" + markdown_table(rows, columns),
    )


if __name__ == "__main__":
    main()
