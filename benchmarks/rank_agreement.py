"""Rank agreement of width criteria with ``influence``'s predicted loss change (issue 25).

SmolLM2-135M, every layer's KV head groups and MLP channels scored by each criterion on the
same calibration (``--n-samples`` C4 windows × 128 tokens, seed 0), in a fresh
``secateurs prune --unit width --allocation global --ratio R`` process per criterion (without
reconstruction: the scores do not depend on it, and the record keeps them as
``width_scores``). For each unit kind the table gives Spearman's rank correlation with
``influence``, pooled over all layers (the ranking that global allocation uses) and the mean
within a layer (the ranking uniform allocation uses), and the overlap of the units the two
plans remove (|A ∩ B| / |A ∪ B|).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/rank_agreement.py --criteria submodel
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _common import markdown_table, run_measured, secateurs_cli, write_results

REFERENCE = "influence"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by position)."""
    ra, rb = (x.argsort().argsort().to(torch.float64) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))


def scored(criterion: str, args, work: Path) -> tuple[dict, float, float]:
    """The run's record (its ``width_scores`` and plan), wall seconds and peak RSS MB."""
    out = work / criterion
    command = [*secateurs_cli(), "prune", args.model, "--unit", "width", "--criterion",
               criterion, "--allocation", "global", "--ratio", str(args.ratio), "--no-reconstruct",
               "--n-samples", str(args.n_samples), "--seed", "0", "--out", str(out)]  # fmt: skip
    seconds, peak = run_measured(command, {"OMP_NUM_THREADS": "1"})
    return json.loads((out / "secateurs.json").read_text()), seconds, peak


def removed_units(record: dict, kind: str) -> set[tuple[int, int]]:
    per_layer = record["plan"][kind]
    return {(layer, unit) for layer, units in enumerate(per_layer) for unit in units}


def agreement(record: dict, reference: dict, kind: str) -> dict:
    mine = [torch.tensor(v, dtype=torch.float64) for v in record["width_scores"][kind]]
    ref = [torch.tensor(v, dtype=torch.float64) for v in reference["width_scores"][kind]]
    finite = [torch.isfinite(a) & torch.isfinite(b) for a, b in zip(mine, ref, strict=True)]
    pooled = spearman(torch.cat([a[f] for a, f in zip(mine, finite, strict=True)]),
                      torch.cat([b[f] for b, f in zip(ref, finite, strict=True)]))  # fmt: skip
    layers = zip(mine, ref, finite, strict=True)
    within = [spearman(a[f], b[f]) for a, b, f in layers if f.sum() > 2]
    a, b = removed_units(record, kind), removed_units(reference, kind)
    return {
        "spearman_pooled": round(pooled, 3),
        "spearman_within_layer_mean": round(sum(within) / len(within), 3),
        "removed": len(a),
        "removed_by_reference": len(b),
        "removed_overlap": round(len(a & b) / len(a | b), 3) if a | b else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--criteria", default="submodel", help="comma-separated")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2709)
    parser.add_argument("--n-samples", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reference, ref_s, ref_mb = scored(REFERENCE, args, Path(tmp))
        rows = []
        for criterion in args.criteria.split(","):
            record, seconds, peak = scored(criterion, args, Path(tmp))
            for kind in ("heads", "channels"):
                rows.append({"criterion": criterion, "kind": kind,
                             **agreement(record, reference, kind),
                             "seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
                             "reference_seconds": round(ref_s, 1),
                             "reference_peak_rss_mb": round(ref_mb, 1)})  # fmt: skip
    columns = [("criterion", "criterion"), ("kind", "unit"),
               ("spearman_pooled", "Spearman, all layers pooled"),
               ("spearman_within_layer_mean", "Spearman, within a layer (mean)"),
               ("removed", f"removed (global {args.ratio})"),
               ("removed_by_reference", f"removed by {REFERENCE}"),
               ("removed_overlap", "removed units shared (|A∩B| / |A∪B|)"),
               ("seconds", "whole prune s"),
               ("reference_seconds", f"{REFERENCE}: whole prune s")]  # fmt: skip
    table = markdown_table(rows, columns)
    write_results("rank-agreement", {"reference": REFERENCE, "ratio": args.ratio,
                                     "n_samples": args.n_samples, "rows": rows}, table)  # fmt: skip


if __name__ == "__main__":
    main()
