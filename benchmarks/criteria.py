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
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, markdown_table, run_measured, write_results  # noqa: E402

from secateurs.adapters import adapter_for  # noqa: E402
from secateurs.api import count_parameters  # noqa: E402
from secateurs.criteria import CRITERIA, ScoringContext  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.evaluate.efficiency import PeakMemory, _proc_status_kb  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.width_api import (  # noqa: E402
    WidthOptions,
    _plan,
    apply_width_plan,
    ensure_input_means,
    parameter_base,
)

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


@contextmanager
def phase_peak(result: dict):
    """Peak resident memory (MB) of the block alone: the kernel's high-water mark, reset at its
    start (so model loading, whose transient copies can exceed any later phase, is excluded)."""
    with PeakMemory(torch.device("cpu")).track():
        yield
    result["phase_peak_mb"] = _proc_status_kb("VmHWM") / 1024


def score_one(args) -> None:
    """Child process: score with one criterion and save the scores (no evaluation here)."""
    model, tokenizer = load_model(args.model)
    ctx = ScoringContext(model, adapter_for(model), calibration(tokenizer, args), 1, progress=False)
    options = {"num_perturbations": args.perturbations} if args.score_one == "mini-llm" else {}
    scorer = CRITERIA.get(args.score_one)(**options)
    memory: dict = {}
    start = time.perf_counter()
    with phase_peak(memory):
        scores = {kind: scorer.score_width(ctx, kind) for kind in KINDS}
    seconds = time.perf_counter() - start
    if args.compensate:  # the compensation pass is not part of scoring: measured apart
        ensure_input_means(ctx, KINDS)
    extras = {k: v for k, v in ctx.extras.items() if k == "input_mean"}
    torch.save({"scores": scores, "seconds": seconds, "extras": extras, **memory}, args.out)


@torch.no_grad()
def inference_one(args) -> None:
    """Child process: the memory reference, one plain forward per calibration batch."""
    model, tokenizer = load_model(args.model)
    batches = calibration(tokenizer, args).split(1)
    memory: dict = {}
    with phase_peak(memory):
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    torch.save(memory, args.out)


# glibc raises its mmap threshold as large buffers are freed, after which freed memory stays in
# the heap and RSS counts allocator caching, not live data (measured: +180 MB after one pass of
# 7 MB temporaries). Pinning the threshold in every measured process, reference included, makes
# the peak reflect what the code holds.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


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
        "--perturbations",
        str(args.perturbations),
        *(["--compensate"] if args.compensate else []),
    ]
    return run_measured(command, MEASURE_ENV)


def evaluate(model, tokenizer, args) -> dict[str, float]:
    protocol = lambda name: PPLProtocol(name, max_windows=args.max_windows)  # noqa: E731
    return {
        n: perplexity(model, tokenizer, protocol(n), progress=False).ppl
        for n in ("wikitext2", "ptb")
    }


def prune_copy(dense, scored: dict, criterion: str, ratio: float, allocation: str, compensated):
    model = copy.deepcopy(dense)
    adapter = adapter_for(model)
    opts = WidthOptions("width", ratio, allocation)
    target = round(ratio * parameter_base(model, False))
    scorer = CRITERIA.get(criterion)()
    layers = opts.layer_range(adapter.num_layers(model))
    compensate = True if compensated else None  # None: the criterion's own default
    plan = _plan(model, adapter, scored["scores"], opts, layers, target, scorer, compensate)
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
    parser.add_argument("--memory-only", action="store_true", help="re-measure memory/time only")
    parser.add_argument(
        "--compensate", action="store_true", help="bias compensation (FLAP) for every criterion"
    )
    parser.add_argument(
        "--perturbations", type=int, default=32, help="mini-llm's K (memory does not depend on K)"
    )
    parser.add_argument("--score-one", help=argparse.SUPPRESS)
    parser.add_argument("--inference-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_one:
        return score_one(args)
    if args.inference_one:
        return inference_one(args)
    memory_only(args) if args.memory_only else run(args)


COLUMNS = [
    ("criterion", "criterion"),
    ("allocation", "allocation"),
    ("ratio", "ratio"),
    ("achieved", "achieved"),
    ("params", "params"),
    ("wikitext2", "WikiText-2 PPL"),
    ("ptb", "PTB PPL"),
    ("scoring_s", "scoring s"),
    ("peak_mb", "scoring peak RSS MB"),
    ("vs_inference", "× inference peak"),
    ("backprop", "backprop"),
]


def scored_in_child(args, name: str, folder: Path) -> dict:
    out = folder / f"{name}.pt"
    child(args, "--score-one", name, out)
    return torch.load(out, weights_only=False)


def reference_peak(args, folder: Path) -> float:
    child(args, "--inference-one", "1", folder / "reference.pt")
    return torch.load(folder / "reference.pt")["phase_peak_mb"]


def memory_row(name: str, scored: dict, reference_mb: float) -> dict:
    return {
        "scoring_s": round(scored["seconds"], 1),
        "peak_mb": round(scored["phase_peak_mb"]),
        "vs_inference": round(scored["phase_peak_mb"] / reference_mb, 3),
        "backprop": CRITERIA.get(name).uses_backward,
    }


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
        reference_mb = reference_peak(args, Path(folder))
        for name in args.criteria.split(","):
            scored = scored_in_child(args, name, Path(folder))
            for ratio in map(float, args.ratios.split(",")):
                for allocation in args.allocations.split(","):
                    model = prune_copy(dense, scored, name, ratio, allocation, args.compensate)
                    params = count_parameters(model)
                    achieved = round((rows[0]["params"] - params) / base, 4)
                    rows.append(
                        {
                            "criterion": name + (" +comp" if args.compensate else ""),
                            "allocation": allocation,
                            "ratio": ratio,
                            "achieved": achieved,
                            "params": params,
                            **evaluate(model, tokenizer, args),
                            **memory_row(name, scored, reference_mb),
                        }
                    )
                    print(rows[-1], flush=True)
    write_table(rows, reference_mb, args)


def memory_only(args) -> None:
    """Re-measure scoring time and peak memory only, and merge them into criteria.json."""
    import json

    with tempfile.TemporaryDirectory() as folder:
        reference_mb = reference_peak(args, Path(folder))
        measured = {
            n: memory_row(n, scored_in_child(args, n, Path(folder)), reference_mb)
            for n in args.criteria.split(",")
        }
    write_results(
        "criteria-memory",
        {"reference_mb": reference_mb, "measured": measured},
        json.dumps(measured, indent=1),
    )
    rows = json.loads((RESULTS / "criteria.json").read_text())["rows"]
    for row in rows:  # keep the full run's scoring time; take the memory columns from here
        row.pop("peak_rss_mb", None)
        memory = {k: v for k, v in measured.get(row["criterion"], {}).items() if k != "scoring_s"}
        row.update(memory)
    write_table(rows, reference_mb, args)


def write_table(rows: list[dict], reference_mb: float, args) -> None:
    protocol = (
        f"SmolLM2-135M, width (heads + channels), ratio of non-embedding parameters, no "
        f"retraining; seq_len 128, first {args.max_windows} windows per test set; "
        f"calibration {args.n_samples} C4 × 128 tokens, seed {args.seed}. Memory: peak RSS of "
        f"the scoring phase (kernel high-water mark reset after loading) in a fresh process per "
        f"criterion (glibc mmap threshold pinned at 128 KiB); reference: one plain inference pass "
        f"over the same batches, "
        f"{reference_mb:.0f} MB; mini-llm memory measured with K={args.perturbations} "
        f"perturbations (it holds K scalars, so its memory does not depend on K)."
    )
    write_results(
        "criteria-compensated" if args.compensate else "criteria",
        {"protocol": protocol, "reference_mb": reference_mb, "rows": rows},
        f"{protocol}\n\n" + markdown_table(rows, COLUMNS),
    )


if __name__ == "__main__":
    main()
