"""``mini-llm`` on SmolLM2-135M: how well forward-only gate gradients rank what matters.

Phase ``sweep`` (one process): the oracle gate gradients a_g = ∂L/∂s_g by backprop (the only
``backward()`` here, for reference), backprop ``taylor``'s default group scores, then for each
estimator setting the Spearman correlations, within each layer (mean over layers) and global
(all layers pooled), of

  - gate:   |â| vs |a|              (the estimate against the oracle)
  - score:  M·|â| vs |a|            (the final mini-llm score vs group-level Taylor |a_g|)
  - taylor: M·|â| vs taylor         (vs our backprop ``taylor`` criterion's default score)

with the exact-gradient ceilings M·|a| on the same lines. Phase ``final`` (fresh processes,
as ``benchmarks/width.py``): scoring time and peak RSS of the chosen mini-llm setting, backprop
``taylor`` and one inference pass; then WikiText-2 / PTB PPL at LLM-Pruner's configuration.

    nice -n 10 python benchmarks/mini_llm.py --phase sweep
    nice -n 10 python benchmarks/mini_llm.py --phase final --options '[{"num_perturbations": 6}]'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import width  # noqa: E402
from _common import RESULTS, markdown_table, write_results  # noqa: E402

from secateurs.criteria import CRITERIA, ScoringContext  # noqa: E402
from secateurs.criteria.mini_llm import combine, gate_gradients  # noqa: E402
from secateurs.criteria.zeroth_order import (  # noqa: E402
    GateEstimate,
    SPSASettings,
    signal_to_noise,
)
from secateurs.models import load_model  # noqa: E402
from secateurs.session.resident import token_nll  # noqa: E402
from secateurs.units.width import output_weight_columns  # noqa: E402

KINDS = ("heads", "channels")
# (label, windows, scope [+ layers per pass], prior power, SPSASettings kwargs)
SWEEP = [
    ("model K=2", 10, "model", 0.0, dict(num_perturbations=2)),
    ("model K=6", 10, "model", 0.0, dict(num_perturbations=6)),
    ("model K=6 prior^1", 10, "model", 1.0, dict(num_perturbations=6)),
    ("layer K=1 one-sided prior^1", 10, "layer", 1.0, dict(num_perturbations=1, antithetic=False)),
    ("layer K=1 one-sided", 10, "layer", 0.0, dict(num_perturbations=1, antithetic=False)),
    (
        "layer K=1 one-sided prior^1, 2 layers/pass",
        10,
        "layer2",
        1.0,
        dict(num_perturbations=1, antithetic=False),
    ),
    # the default (K = 1), and at 4× and 16× the passes: how far more samples go
    *[
        (
            f"layer K={k} one-sided prior^1, 3 layers/pass",
            10,
            "layer3",
            1.0,
            dict(num_perturbations=k, antithetic=False),
        )
        for k in (1, 4, 16)
    ],
]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def agreement(ours: list[torch.Tensor], truth: list[torch.Tensor]) -> dict[str, float]:
    """Spearman within each layer (mean) and over all layers pooled."""
    within = [spearman(o, t) for o, t in zip(ours, truth, strict=True)]
    pooled = spearman(torch.cat(ours), torch.cat(truth))
    return {"within": round(sum(within) / len(within), 4), "global": round(pooled, 4)}


def _gate_hook(s: torch.Tensor, columns: torch.Tensor, center: torch.Tensor | None = None):
    def hook(module, args):
        x = args[0]
        scale = torch.ones(x.shape[-1]).index_put(
            (columns.flatten(),), s.repeat_interleave(columns.shape[1])
        )
        if center is not None:  # scale the fluctuation around the mean, keep the mean
            return (center + (x - center) * scale, *args[1:])
        return (x * scale, *args[1:])

    return hook


def magnitudes(ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
    """M_g of the paper's product: the `activation` criterion's score."""
    return CRITERIA.get("activation")().score_width(ctx, kind)


def references(ctx: ScoringContext) -> dict:
    """Per kind: oracle gates, M, taylor's default scores and its in-process seconds."""
    refs = {}
    for kind in KINDS:
        start = time.perf_counter()
        taylor = CRITERIA.get("taylor")().score_width(ctx, kind)
        taylor_s = time.perf_counter() - start
        gates = exact_gates(ctx, kind)
        with torch.no_grad():
            start = time.perf_counter()
            mags = magnitudes(ctx, kind)
            pass_s = time.perf_counter() - start
        refs[kind] = dict(gates=gates, M=mags, taylor=taylor, taylor_s=taylor_s, pass_s=pass_s)
    return refs


def ceilings(refs: dict) -> list[dict]:
    """Rows for the exact gate gradient plugged into each combination (what K → ∞ gives)."""
    rows = []
    for kind, r in refs.items():
        truth = [g.abs() for g in r["gates"]]
        for how in ("gate", "paper"):
            exact = [combine(m, g, how) for m, g in zip(r["M"], r["gates"], strict=True)]
            rows.append(_row("exact a (backprop)", kind, how, exact, truth, r["taylor"]))
        m_only = _row("M only (activation)", kind, "–", r["M"], truth, r["taylor"])
        rows.append(m_only)
    return rows


def _row(label, kind, how, scores, truth, taylor, gates=None) -> dict:
    row = {"setting": label, "kind": kind, "combine": how}
    if gates is not None:
        row.update({f"gate_{k}": v for k, v in agreement([g.abs() for g in gates], truth).items()})
    row.update({f"score_{k}": v for k, v in agreement(scores, truth).items()})
    row.update({f"taylor_{k}": v for k, v in agreement(scores, taylor).items()})
    return row


def sweep_rows(model, tokenizer, args, refs10: dict) -> list[dict]:
    rows, refs = [], {10: refs10}
    for label, windows, scope, power, options in SWEEP:
        if args.only and label not in args.only.split(";"):
            continue
        if windows not in refs:
            refs[windows] = references(_ctx(model, tokenizer, args, windows))
        ctx = _ctx(model, tokenizer, args, windows)
        for kind in KINDS:
            r = refs[windows][kind]
            start = time.perf_counter()
            with torch.no_grad():
                settings = SPSASettings(**options)
                per_pass = int(scope[5:] or 1) if scope.startswith("layer") else 1
                estimates = gate_gradients(ctx, kind, settings, scope[:5], r["M"], power, per_pass)
            seconds = time.perf_counter() - start + r["pass_s"]  # + the ‖X‖ pass
            gates = [e.mean for e in estimates]
            truth = [g.abs() for g in r["gates"]]
            noise = noise_levels(estimates, r["gates"])
            for how in ("paper", "gate"):
                scores = [combine(m, g, how) for m, g in zip(r["M"], gates, strict=True)]
                row = _row(label, kind, how, scores, truth, r["taylor"], gates)
                row.update(windows=windows, seconds=round(seconds, 1), **noise)
                row["x_taylor"] = round(seconds / r["taylor_s"], 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def noise_levels(estimates: list[GateEstimate], exact: list[torch.Tensor]) -> dict:
    """Median over layers of the estimator's own signal-to-noise ratio, and of the oracle's
    mean a_g² over the estimated noise variance (what the ratio should read)."""
    own = torch.tensor([signal_to_noise(e) for e in estimates])
    oracle = torch.tensor(
        [float(a.pow(2).mean() / e.variance.mean()) for e, a in zip(estimates, exact, strict=True)]
    )
    # text: the ratios span orders of magnitude, which the tables' 2 decimals would hide
    return {"snr": f"{own.nanmedian():.2g}", "snr_oracle": f"{oracle.median():.2g}"}


def _ctx(model, tokenizer, args, windows: int) -> ScoringContext:
    """One window per forward, as width.py scores."""
    return width.scoring_context(model, tokenizer, width.calibration(tokenizer, args, windows))


def run_sweep(args, previous: list[dict]) -> dict:
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    refs = references(_ctx(model, tokenizer, args, 10))
    timing = {k: {"taylor_s": r["taylor_s"], "pass_s": r["pass_s"]} for k, r in refs.items()}
    rows = ceilings(refs)
    for row in rows:
        print(json.dumps(row), flush=True)
    rows += sweep_rows(model, tokenizer, args, refs)
    fresh = {row["setting"] for row in rows}  # rows of settings not rerun are kept
    return {"sweep": rows + [r for r in previous if r["setting"] not in fresh], **timing_of(timing)}


def timing_of(timing: dict) -> dict:
    return {"sweep_timing": {k: {n: round(v, 1) for n, v in t.items()} for k, t in timing.items()}}


def run_final(args) -> dict:
    """Fresh-process time / peak RSS (mini-llm variants, taylor, inference), then PPL at
    LLM-Pruner's configuration with reconstruction (as width.py)."""
    torch.set_num_threads(1)
    width.CACHE.mkdir(parents=True, exist_ok=True)
    args.resume = False
    reference = width.reference_peak(args)
    args.criterion_options = "{}"
    taylor = width.scored_in_child(args, "taylor")
    rows = [_timing_row("taylor", taylor, reference, taylor)]
    ppl = []
    for options in args.options:
        args.criterion_options = json.dumps({"mini-llm": options})
        scored = width.scored_in_child(args, "mini-llm")
        label = "mini-llm " + json.dumps(options)
        rows.append(_timing_row(label, scored, reference, taylor))
        if not args.no_ppl:
            ppl.append({"criterion": label, **ppl_row(args, scored)})
        print(json.dumps(rows[-1]), flush=True)
    rows.append({"what": "inference pass", "peak_mb": round(reference), "x_inference": 1.0})
    if args.oracle_ppl:
        ppl += oracle_ppl(args)
    return {"timing": rows, "ppl": ppl}


def oracle_ppl(args) -> list[dict]:
    """PPL with the exact gate gradient (backprop) in place of â: the ceiling of the estimator."""
    model, tokenizer = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    refs = references(_ctx(model, tokenizer, args, args.n_samples))
    rows = []
    for how in ("paper", "gate"):
        scores = {
            kind: [combine(m, a, how) for m, a in zip(r["M"], r["gates"], strict=True)]
            for kind, r in refs.items()
        }
        label = f"exact a (backprop), combine={how}"
        rows.append({"criterion": label, **ppl_row(args, {"scores": scores, "extras": {}})})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# --- other ways to combine exact gradients (phase "ceilings") -------------------------------
def run_ceilings(args) -> dict:
    """PPL of other magnitude × activation × gradient combinations, each with exact (backprop)
    gradients unless named "estimate": do they get past the product's ceiling?"""
    torch.set_num_threads(1)
    model, tokenizer = load_model(args.model)
    for p in model.parameters():
        p.requires_grad_(False)
    ctx = _ctx(model, tokenizer, args, args.n_samples)
    views = {kind: ceiling_views(ctx, kind) for kind in KINDS}
    rows = []
    for name in args.variants.split(","):
        scores = {kind: VARIANTS[name][1](v) for kind, v in views.items()}
        label = VARIANTS[name][0]
        rows.append({"criterion": label, **ppl_row(args, {"scores": scores, "extras": {}})})
        print(json.dumps(rows[-1]), flush=True)
    return {"timing": [], "ppl": rows}


def ceiling_views(ctx: ScoringContext, kind: str) -> dict:
    """Per layer: M, per-window exact gate gradients (windows, groups), the exact gates that
    scale only each input's fluctuation around its calibration mean and M over centered inputs,
    and the default estimator's â and variances."""
    means, centered_norms = input_moments(ctx, kind)
    with torch.no_grad():
        M = magnitudes(ctx, kind)
        criterion = CRITERIA.get("mini-llm")()
        estimates = gate_gradients(
            ctx, kind, criterion.settings, criterion.scope, M, 1.0, criterion.layers_per_pass
        )
    centered_M = []
    for layer in range(ctx.num_layers()):
        module, columns = ctx.output_projection(layer, kind)
        weight = output_weight_columns(module, ctx.adapter.width_layout(kind).conv1d).float()
        centered_M.append((weight.abs().sum(0) * centered_norms[layer])[columns].sum(-1).double())
    return {
        "M": [m.double() for m in M],
        "per_window": exact_gates(ctx, kind, per_window=True),
        "centered": exact_gates(ctx, kind, centers=means),
        "centered_M": centered_M,
        "estimates": estimates,
    }


def input_moments(ctx: ScoringContext, kind: str):
    """Per layer: the mean (in,) and centered norm ‖X_j − μ_j‖ of the output projection's
    inputs over the calibration tokens."""
    sums, handles = [], []
    for layer in range(ctx.num_layers()):
        module, _ = ctx.output_projection(layer, kind)
        acc = {"n": 0, "s": 0.0, "q": 0.0}

        def hook(module, args, acc=acc):
            x = args[0].double().flatten(0, -2)
            acc["n"] += x.shape[0]
            acc["s"] = acc["s"] + x.sum(0)
            acc["q"] = acc["q"] + x.pow(2).sum(0)

        handles.append(module.register_forward_pre_hook(hook))
        sums.append(acc)
    with torch.no_grad():
        for batch in ctx.batches():
            ctx.model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    means = [(a["s"] / a["n"]).float() for a in sums]
    norms = [(a["q"] - a["s"].pow(2) / a["n"]).clamp_min(0).sqrt().float() for a in sums]
    return means, norms


def exact_gates(ctx: ScoringContext, kind: str, per_window=False, centers=None):
    """Backprop gate gradients per layer: of the mean window loss (groups,), or each window's
    (``per_window``: (windows, groups)); ``centers``: gates scale x − μ (μ kept) instead of x."""
    windows = len(ctx.calibration)
    runs = [ctx.calibration[b : b + 1] for b in range(windows)] if per_window else [None]
    out = [[] for _ in range(ctx.num_layers())]
    for run in runs:
        gates, handles = [], []
        for layer in range(ctx.num_layers()):
            module, columns = ctx.output_projection(layer, kind)
            s = torch.ones(columns.shape[0], requires_grad=True)
            center = None if centers is None else centers[layer]
            handles.append(module.register_forward_pre_hook(_gate_hook(s, columns, center)))
            gates.append(s)
        try:
            for batch in [run] if per_window else ctx.batches():
                logits = ctx.model(input_ids=batch, use_cache=False).logits
                losses = token_nll(logits, batch).mean(-1)  # each window's mean NLL
                (losses.sum() / (1 if per_window else windows)).backward()
        finally:
            for handle in handles:
                handle.remove()
        for layer, s in enumerate(gates):
            out[layer].append(s.grad.double())
    return [torch.stack(g) if per_window else g[0] for g in out]


def shrunk_abs(estimate: GateEstimate) -> torch.Tensor:
    """E[|a_g| | â_g] under a per-layer prior a ~ N(0, τ²), τ² = max(mean(â² − v), tiny): where
    the noise dominates, every gate's expected |a| is about the same and M decides."""
    tau2 = (estimate.mean.pow(2) - estimate.variance).mean().clamp_min(1e-30)
    shrink = tau2 / (tau2 + estimate.variance)
    mean, std = shrink * estimate.mean, (shrink * estimate.variance).sqrt().clamp_min(1e-30)
    normal = torch.distributions.Normal(0.0, 1.0)
    r = (mean / std).abs()
    return std * normal.log_prob(r).exp() * 2 + mean.abs() * (1 - 2 * normal.cdf(-r))


VARIANTS = {
    "fisher": (
        "exact per-window a_b, M·√(mean_b a_b²) (Fisher)",
        lambda v: [
            m * a.pow(2).mean(0).sqrt() for m, a in zip(v["M"], v["per_window"], strict=True)
        ],
    ),
    "mean-abs": (
        "exact per-window a_b, M·mean_b |a_b|",
        lambda v: [m * a.abs().mean(0) for m, a in zip(v["M"], v["per_window"], strict=True)],
    ),
    "centered": (
        "exact centered gates a^c (x → μ + s(x − μ)), M over centered inputs · |a^c|",
        lambda v: [m * a.abs() for m, a in zip(v["centered_M"], v["centered"], strict=True)],
    ),
    "centered-gate": (
        "exact centered gates a^c, M·|a^c|",
        lambda v: [m * a.abs() for m, a in zip(v["M"], v["centered"], strict=True)],
    ),
    "shrunk": (
        "estimate (default), M·E[|a| | â] (noise-aware shrinkage)",
        lambda v: [m * shrunk_abs(e) for m, e in zip(v["M"], v["estimates"], strict=True)],
    ),
}


def _timing_row(label: str, scored: dict, reference: float, taylor: dict) -> dict:
    return {
        "what": label,
        "seconds": round(scored["seconds"], 1),
        "x_taylor": round(scored["seconds"] / taylor["seconds"], 2),
        "peak_mb": round(scored["phase_peak_mb"]),
        "x_inference": round(scored["phase_peak_mb"] / reference, 3),
    }


def ppl_row(args, scored: dict) -> dict:
    dense, tokenizer = load_model(args.model)
    args.tokenizer = tokenizer
    fit = width.calibration(tokenizer, args, args.fit_samples)
    setting = width.SETTINGS["llm-pruner"]
    model, _, _ = width.prune_copy(dense, scored, "mini-llm", setting, fit, args)
    return {"setting": "llm-pruner", "reconstruct": True, **width.evaluate(model, tokenizer, args)}


SWEEP_COLUMNS = [
    ("setting", "setting"),
    ("kind", "kind"),
    ("combine", "combine"),
    ("gate_within", "gate ρ within"),
    ("gate_global", "gate ρ global"),
    ("score_within", "score vs |a| within"),
    ("score_global", "score vs |a| global"),
    ("taylor_within", "vs taylor within"),
    ("taylor_global", "vs taylor global"),
    ("seconds", "s (in-process)"),
    ("x_taylor", "× taylor"),
    ("snr", "signal/noise, est."),
    ("snr_oracle", "a²/v (oracle)"),
]


def report(results: dict) -> None:
    parts = [results.get("protocol", "")]
    if "sweep" in results:
        parts.append(markdown_table(results["sweep"], SWEEP_COLUMNS))
    if "timing" in results:
        cols = [
            ("run", "run"),
            ("what", "scoring (fresh process, both kinds)"),
            ("seconds", "s"),
            ("x_taylor", "× taylor"),
            ("peak_mb", "peak MB"),
            ("x_inference", "× inference"),
        ]
        parts.append(markdown_table(results["timing"], cols))
        cols = [
            ("run", "run"),
            ("criterion", "criterion"),
            ("setting", "setting"),
            ("reconstruct", "reconstruct"),
            ("wikitext2", "WikiText-2"),
            ("ptb", "PTB"),
        ]
        parts.append(markdown_table(results["ppl"], cols))
    write_results("mini-llm", results, "\n\n".join(parts))


PROTOCOL = (
    "SmolLM2-135M, one thread, nice 10, shared machine (compare seconds only as ratios within "
    "a run). Calibration: C4 windows × 128 tokens, seed 0 (10 unless stated). Oracle a_g: exact "
    "gate gradient of the mean window loss by backprop. ρ: Spearman, 'within' = mean over the "
    "30 layers of the per-layer ρ (heads: 3 groups per layer), 'global' = all layers pooled. "
    "'× taylor': seconds (incl. the ‖X‖ pass) over backprop taylor's in the same process. "
    "PPL: WikiText-2 / PTB, first 64 windows × 128 tokens, no BOS, LLM-Pruner's configuration "
    "(ratio 0.2709, layers 4..27, uniform), reconstruction on 64 C4 windows, damping 0.01."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("sweep", "final", "ceilings"), required=True)
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="ceilings: " + ", ".join(VARIANTS)
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--options", type=json.loads, default=[{}], help="mini-llm option sets (JSON list)"
    )
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--fit-samples", type=int, default=64)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--damping", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ppl", action="store_true", help="final: time and memory only")
    parser.add_argument("--oracle-ppl", action="store_true", help="final: PPL of exact gates too")
    parser.add_argument("--only", default="", help="sweep labels to run (;-separated)")
    args = parser.parse_args()
    args.no_intercept = False
    path = RESULTS / "mini-llm.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if args.phase == "sweep":
        results.update(run_sweep(args, results.get("sweep", [])))
    else:  # runs accumulate; ratios compare rows of the same run only
        new = run_final(args) if args.phase == "final" else run_ceilings(args)
        run = 1 + max((r.get("run", 1) for r in results.get("timing", [])), default=0)
        for key in ("timing", "ppl"):
            old = [
                {"run": 1, **row} for row in results.get(key, [])
            ]  # rows before runs were numbered
            results[key] = old + [{"run": run, **row} for row in new[key]]
    results["protocol"] = PROTOCOL
    report(results)


if __name__ == "__main__":
    main()
