"""Width vs depth at the same parameter budget on SmolLM2-135M.

Every width criterion × {uniform, global} allocation prunes ``--ratio`` of the non-embedding
parameters; the depth baseline removes the number of blocks (``ppl+``) closest to the same
count. Each method runs in a fresh process (peak RSS is that process's), then WikiText-2 / PTB
perplexity is measured with the recorded protocol.

    python benchmarks/width.py --max-windows 64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, run_measured, write_results  # noqa: E402

WIDTH_CRITERIA = ("magnitude", "activation", "taylor", "fluctuation")
COLUMNS = [
    ("method", "method"),
    ("allocation", "allocation"),
    ("wikitext2", "WikiText-2 PPL"),
    ("ptb", "PTB PPL"),
    ("params", "params"),
    ("achieved_ratio", "removed (non-emb.)"),
    ("scoring_s", "scoring s"),
    ("peak_rss_mb", "peak RSS MB"),
]


def one(spec: dict, out: Path) -> None:
    """Prune and evaluate one method in this process; write its row as JSON to ``out``."""
    from secateurs.api import prune
    from secateurs.data import CalibrationConfig
    from secateurs.evaluate.ppl import PPLProtocol, perplexity
    from secateurs.models import load_model
    from secateurs.width_api import count_unique, parameter_base

    model, tokenizer = load_model(spec["model"])
    calibration = CalibrationConfig(n_samples=spec["n_samples"])
    row = {"method": spec["method"], "allocation": spec.get("allocation", "–")}
    if spec["kind"] == "none":
        record = {"parameters": {"after": count_unique(model)}, "timings": {"scoring_s": 0.0}}
    elif spec["kind"] == "depth":
        base = parameter_base(model, False)
        record = prune(
            model,
            tokenizer,
            criterion="ppl+",
            unit="block",
            remove=spec["remove"],
            calibration=calibration,
            progress=False,
        ).record
        record["parameters"]["achieved_ratio"] = (
            record["parameters"]["before"] - record["parameters"]["after"]
        ) / base
    else:
        record = prune(
            model,
            tokenizer,
            criterion=spec["method"],
            unit="width",
            ratio=spec["ratio"],
            allocation=spec["allocation"],
            calibration=calibration,
            progress=False,
        ).record
    row.update(
        params=record["parameters"]["after"],
        achieved_ratio=record["parameters"].get("achieved_ratio"),
        scoring_s=record["timings"]["scoring_s"],
    )
    for dataset in ("wikitext2", "ptb"):
        protocol = PPLProtocol(dataset, seq_len=spec["seq_len"], max_windows=spec["max_windows"])
        row[dataset] = perplexity(model, tokenizer, protocol, progress=False).ppl
    out.write_text(json.dumps(row))


def depth_blocks(model_name: str, ratio: float) -> int:
    """Blocks whose removal is closest to ``ratio`` of the non-embedding parameters."""
    from secateurs.adapters import adapter_for
    from secateurs.models import load_model
    from secateurs.width_api import parameter_base

    model, _ = load_model(model_name)
    layer = adapter_for(model).layers(model)[0]
    per_block = sum(p.numel() for p in layer.parameters())
    return max(1, round(ratio * parameter_base(model, False) / per_block))


def specs(args: argparse.Namespace) -> list[dict]:
    common = dict(
        model=args.model,
        seq_len=args.seq_len,
        max_windows=args.max_windows,
        n_samples=args.n_samples,
        ratio=args.ratio,
    )
    rows = [dict(common, method="original", kind="none")]
    for criterion in WIDTH_CRITERIA:
        for allocation in ("uniform", "global"):
            rows.append(dict(common, method=criterion, kind="width", allocation=allocation))
    blocks = depth_blocks(args.model, args.ratio)
    rows.append(dict(common, method=f"depth ppl+ ({blocks} blocks)", kind="depth", remove=blocks))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--n-samples", type=int, default=10, help="calibration windows (128 tok)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one), args.row_out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs(args)):
            out = Path(tmp) / f"{i}.json"
            command = [sys.executable, __file__, "--one", json.dumps(spec), "--row-out", str(out)]
            try:
                _, peak = run_measured(command)
            except subprocess.CalledProcessError as err:
                rows.append({"method": spec["method"], "error": str(err)})
                continue
            rows.append({**json.loads(out.read_text()), "peak_rss_mb": peak})
            print(json.dumps(rows[-1]), flush=True)
    protocol = {
        "ratio_of": "non-embedding parameters",
        "ratio": args.ratio,
        "seq_len": args.seq_len,
        "max_windows": args.max_windows,
        "bos": "stream",
        "calibration": f"c4, {args.n_samples} x 128 tokens, seed 0",
        "model": args.model,
    }
    note = (
        f"\n\nSmolLM2-135M, {args.ratio:.0%} of non-embedding parameters; PPL at seq "
        f"{args.seq_len}, first {args.max_windows} windows; no recovery training."
    )
    write_results(
        "width", {"protocol": protocol, "rows": rows}, markdown_table(rows, COLUMNS) + note
    )


if __name__ == "__main__":
    main()
