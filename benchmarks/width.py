"""Width pruning on SmolLM2-135M: every criterion, with and without reconstruction.

Settings (``--settings``): ``llm-pruner`` is LLM-Pruner's configuration (27.09% of the
non-embedding parameters, layers 4..27 only, uniform allocation: one of 3 KV groups and 523 of
1536 channels per layer); ``global-20`` / ``global-35`` prune 20% / 35% over all layers with
global allocation; ``sensitive-*`` the same with the learned per-layer sensitivity.

Every criterion scores heads and channels once, in a fresh process whose peak RSS is its own
(a fresh process running one plain inference pass over the same calibration batches is the
memory reference); each score set is then allocated, cut from a copy of the dense model, with
or without reconstruction, and evaluated without retraining. Rows are appended to the JSON as
they finish, so a long run can be read (and resumed with ``--resume``) before it ends.

    python benchmarks/width.py --max-windows 64
    python benchmarks/width.py --criteria fluctuation --settings llm-pruner --max-windows 0
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    RESULTS,
    markdown_table,
    peak_rss_since_reset_mb,
    run_measured,
    write_atomically,
    write_results,
)

from secateurs.calibration import Windows  # noqa: E402
from secateurs.choose import (  # noqa: E402
    budget_params,
    compensates,
    decoder_parameters,
    input_means,
    senses,
    width_plan,
)
from secateurs.criteria import CRITERIA, ScoringContext  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.evaluate.efficiency import PeakMemory  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.fit import cut  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.runinfo import count_parameters  # noqa: E402
from secateurs.sensitivity import layer_sensitivity  # noqa: E402
from secateurs.session import ResidentSession  # noqa: E402
from secateurs.session.flow import Flow  # noqa: E402
from secateurs.spec import PruneSpec  # noqa: E402
from secateurs.units import apply_plan  # noqa: E402

CRITERIA_NAMES = [
    "magnitude",
    "activation",
    "taylor",
    "fluctuation",
    "mini-llm",
    "hywia",
    "influence",
    "submodel",
]
KINDS = ("heads", "channels")
SETTINGS = {
    "llm-pruner": dict(ratio=0.2709, layers=(4, 28), allocation="uniform"),
    "global-27": dict(ratio=0.2709, allocation="global"),  # LLM-Pruner's count, all layers
    "global-20": dict(ratio=0.20, allocation="global"),
    "global-35": dict(ratio=0.35, allocation="global"),
    # the same without the learned per-layer sensitivity (FLAP-standardised global ranking)
    "global-27-plain": dict(ratio=0.2709, allocation="global", sensitivity=False),
    "global-20-plain": dict(ratio=0.20, allocation="global", sensitivity=False),
    "global-35-plain": dict(ratio=0.35, allocation="global", sensitivity=False),
}
CACHE = Path("/tmp/secateurs-width-bench")  # scores, reused across runs (--resume)


def calibration(tokenizer, args, n_samples: int | None = None) -> torch.Tensor:
    config = CalibrationConfig("c4", n_samples or args.n_samples, 128, args.seed)
    return config.load(tokenizer)


@contextmanager
def phase_peak(result: dict):
    """Peak resident memory (MB) of the block alone: the kernel's high-water mark, reset at its
    start (so model loading, whose transient copies can exceed any later phase, is excluded)."""
    with PeakMemory(torch.device("cpu")).track():
        yield
    result["phase_peak_mb"] = peak_rss_since_reset_mb()


def scoring_context(model, tokenizer, tokens: torch.Tensor) -> ScoringContext:
    """Scoring on ``tokens`` one window per forward (this benchmark's protocol throughout)."""
    session = ResidentSession(model, tokenizer)
    return ScoringContext(session, Flow(session, tokens, batch_size=1), progress=False)


def score_one(args) -> None:
    """Child process: score with one criterion and save the scores (no evaluation here)."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    ctx = scoring_context(model, tokenizer, calibration(tokenizer, args))
    scorer = CRITERIA.get(args.score_one)(**json.loads(args.criterion_options))
    memory: dict = {}
    start = time.perf_counter()
    with phase_peak(memory):
        scores = {kind: scorer.score_width(ctx, kind) for kind in KINDS}
    seconds = time.perf_counter() - start
    details = {k: v for k, v in ctx.extras.items() if k != "input_mean"}  # as the record's
    extras = {"input_mean": input_means(ctx, KINDS)}  # for FLAP's compensation; not scoring
    saved = {"scores": scores, "seconds": seconds, "extras": extras, "details": details}
    torch.save({**saved, **memory}, args.out)


@torch.no_grad()
def inference_one(args) -> None:
    """Child process: the memory reference, one plain forward per calibration batch."""
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    batches = calibration(tokenizer, args).split(1)
    memory: dict = {}
    with phase_peak(memory):
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    torch.save(memory, args.out)


# glibc raises its mmap threshold as large buffers are freed, after which freed memory stays in
# the heap and RSS counts allocator caching, not live data. Pinning the threshold in every
# measured process, reference included, makes the peak reflect what the code holds.
MEASURE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1"}


def child(args, flag: str, value: str, out: Path, options: str = "{}") -> tuple[float, float]:
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
        "--criterion-options",
        options,
    ]
    return run_measured(command, MEASURE_ENV)


def evaluate(model, tokenizer, args) -> dict[str, float]:
    windows = args.max_windows or None
    protocol = lambda name: PPLProtocol(name, bos="none", max_windows=windows)  # noqa: E731
    return {
        n: perplexity(model, tokenizer, protocol(n), progress=False).ppl
        for n in ("wikitext2", "ptb")
    }


def width_spec(criterion: str, setting: dict, fit_tokens, args) -> PruneSpec:
    """The run's options: the setting, reconstruction on ``fit_tokens`` (8 windows per
    forward) or none, the intercept unless ``--no-intercept``."""
    fit = {"calibration": fit_tokens, "batch_size": 8} if fit_tokens is not None else {}
    return PruneSpec.from_options(
        unit="width", criterion=criterion, reconstruct=fit_tokens is not None,
        reconstruct_damping=args.damping, compensate=False if args.no_intercept else None,
        **setting, **fit,
    )  # fmt: skip


def prune_copy(dense, scored: dict, criterion: str, setting: dict, fit_tokens, args):
    """A pruned copy of ``dense``; with ``fit_tokens`` reconstructed, else FLAP's compensation
    where the criterion has it by default (fluctuation)."""
    model = copy.deepcopy(dense)
    spec = width_spec(criterion, setting, fit_tokens, args)
    session = ResidentSession(model, args.tokenizer)
    scorer = CRITERIA.get(criterion)()
    layers = spec.allocation.layer_range(session.num_layers)
    sensitivity, sensing_s = None, 0.0
    if senses(spec, scorer):  # as `secateurs prune`: not for loss-unit scores (influence)
        sensitivity, sensing_s = sensitivity_of(dense, scored, spec, layers, args)
    target = budget_params(session, spec)
    compensating = compensates(spec, scorer)  # never with reconstruction (its intercept)
    plan = width_plan(
        session, spec, scorer, scored["scores"], layers, target, compensating, sensitivity
    )
    if fit_tokens is None:
        apply_plan(model, plan, session.adapter, scored["extras"].get("input_mean"))
        return model, 0.0, sensing_s
    report = cut(session, plan, spec, Windows(spec.data, session, progress=False), {})
    return model, report.reconstruction["seconds"], sensing_s


def sensitivity_of(dense, scored: dict, spec: PruneSpec, layers, args) -> tuple[dict, float]:
    """Per-layer sensitivity on the scoring calibration and its seconds (cached on disk per
    score file and ratio)."""
    ratio = spec.budget.ratio
    out = CACHE / f"sensitivity-{scored['file']}-{ratio}-{layers[0]}-{layers[-1]}.json"
    if not out.exists():
        ctx = scoring_context(dense, args.tokenizer, calibration(args.tokenizer, args))
        start = time.perf_counter()
        values = layer_sensitivity(ctx.flow, scored["scores"], layers, ratio)
        seconds = round(time.perf_counter() - start, 1)
        write_atomically(out, json.dumps({"values": values, "seconds": seconds}))
    cached = json.loads(out.read_text())
    return cached["values"], cached["seconds"]


COLUMNS = [
    ("setting", "setting"),
    ("criterion", "criterion"),
    ("reconstruct", "reconstruct"),
    ("achieved", "removed"),
    ("params", "params"),
    ("wikitext2", "WikiText-2"),
    ("ptb", "PTB"),
    ("windows", "windows"),
    ("scoring_s", "scoring s"),
    ("reconstruct_s", "reconstruct s"),
    ("sensitivity_s", "sensitivity s"),
    ("peak_mb", "scoring peak MB"),
    ("vs_inference", "× inference"),
]


def scored_in_child(args, name: str) -> dict:
    options = json.dumps(json.loads(args.criterion_options).get(name, {}))
    out = CACHE / f"{name}-{args.n_samples}-{hashlib.sha1(options.encode()).hexdigest()[:8]}.pt"
    if not (args.resume and out.exists()):
        child(args, "--score-one", name, out, options)
    return {**torch.load(out, weights_only=False), "file": out.stem}


def reference_peak(args) -> float:
    out = CACHE / f"reference-{args.n_samples}.pt"
    if not (args.resume and out.exists()):
        child(args, "--inference-one", "1", out)
    return torch.load(out)["phase_peak_mb"]


def run(args) -> None:
    torch.set_num_threads(1)
    CACHE.mkdir(parents=True, exist_ok=True)
    dense, tokenizer = load_model(args.model)
    args.tokenizer = tokenizer
    base = decoder_parameters(ResidentSession(dense), False)
    dense_params = count_parameters(dense)
    results = load_previous(args)
    rows = results["rows"]
    done = {(r["setting"], r["criterion"], r["reconstruct"], r["windows"]) for r in rows}
    if not args.skip_dense and ("dense", "–", False, args.max_windows) not in done:
        rows.append(dense_row(dense, dense_params, tokenizer, args))
        save(results, args)
    fit = calibration(tokenizer, args, args.fit_samples)
    reference_mb = reference_peak(args)
    results["reference_mb"] = reference_mb
    for name in args.criteria.split(","):
        scored = scored_in_child(args, name)
        for setting in args.settings.split(","):
            for recon in (r == "on" for r in args.reconstruct.split(",")):
                if (setting, name, recon, args.max_windows) in done:
                    continue
                model, seconds, sensing_s = prune_copy(
                    dense, scored, name, SETTINGS[setting], fit if recon else None, args
                )
                params = count_parameters(model)
                rows.append(
                    {
                        "setting": setting,
                        "criterion": name,
                        "reconstruct": recon,
                        "achieved": round((dense_params - params) / base, 4),
                        "params": params,
                        **evaluate(model, tokenizer, args),
                        "windows": args.max_windows,
                        "scoring_s": round(scored["seconds"], 1),
                        "reconstruct_s": round(seconds, 1),
                        "sensitivity_s": sensing_s,
                        "peak_mb": round(scored["phase_peak_mb"]),
                        "vs_inference": round(scored["phase_peak_mb"] / reference_mb, 3),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
                save(results, args)
    save(results, args, final=True)


def dense_row(dense, params: int, tokenizer, args) -> dict:
    return {
        "setting": "dense",
        "criterion": "–",
        "reconstruct": False,
        "params": params,
        **evaluate(dense, tokenizer, args),
        "windows": args.max_windows,
    }


def load_previous(args) -> dict:
    path = RESULTS / f"{args.name}.json"
    if args.resume and path.exists():
        return json.loads(path.read_text())
    return {"rows": []}


def save(results: dict, args, final: bool = False) -> None:
    results["protocol"] = (
        "SmolLM2-135M, width (KV head groups + MLP channels), ratio of non-embedding "
        "parameters, no retraining. PPL: WikiText-2 test / PTB, 128-token windows, no BOS, "
        "the first `windows` windows (0 = the full test set). Calibration: scoring "
        f"{args.n_samples} C4 windows × 128 tokens, reconstruction {args.fit_samples} windows, "
        f"seed {args.seed}; damping {args.damping}"
        f"{', no intercept' if args.no_intercept else ''}. Scoring time and peak RSS "
        "(kernel high-water mark of the scoring phase) measured in a fresh process per "
        "criterion, one thread; "
        "× inference: against one plain inference pass over the same batches."
    )
    rows = sorted(results["rows"], key=lambda r: (r["setting"], r["criterion"], r["reconstruct"]))
    table = f"{results['protocol']}\n\n" + markdown_table(rows, COLUMNS)
    if final:
        write_results(args.name, results, table)
    else:
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_atomically(RESULTS / f"{args.name}.json", json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--criteria", default=",".join(CRITERIA_NAMES))
    parser.add_argument("--settings", default="llm-pruner,global-20,global-35")
    parser.add_argument("--reconstruct", default="on,off", help="on, off or on,off")
    parser.add_argument("--max-windows", type=int, default=64, help="0: the full test sets")
    parser.add_argument("--n-samples", type=int, default=10, help="scoring calibration windows")
    parser.add_argument("--fit-samples", type=int, default=64, help="reconstruction windows")
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-intercept", action="store_true", help="fit weights only, no bias")
    parser.add_argument("--name", default="width", help="results file stem")
    parser.add_argument("--resume", action="store_true", help="reuse cached scores and rows")
    parser.add_argument("--skip-dense", action="store_true", help="no dense row (known already)")
    parser.add_argument(
        "--criterion-options", default="{}", help='JSON per criterion, e.g. {"mini-llm": {...}}'
    )
    parser.add_argument("--score-one", help=argparse.SUPPRESS)
    parser.add_argument("--inference-one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.score_one:
        return score_one(args)
    if args.inference_one:
        return inference_one(args)
    run(args)


if __name__ == "__main__":
    main()
