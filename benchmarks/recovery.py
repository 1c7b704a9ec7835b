"""Recovery methods side by side on pruned SmolLM2-135M: PPL before/after, wall time, tokens/s.

Every method gets the same training budget (cpt+lora splits it half and half) of packed C4
text (the local C4 sample minus every URL of the C4 eval subset, so no overlap with evaluation).
Perplexity: WikiText-2 test and PTB validation, 128-token windows, BOS at stream start, the first
``--max-windows`` windows.

    python benchmarks/recovery.py --pruned /tmp/pruned10 --width /tmp/width20 --tokens 16384

Writes benchmarks/results/recovery.json and recovery.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from secateurs.data import data_dir
from secateurs.evaluate.ppl import PPLProtocol, perplexity
from secateurs.models import load_model
from secateurs.recover import DEFAULT_LR, METHODS, TrainConfig, recover

log = logging.getLogger("benchmarks.recovery")
DATASETS = ("wikitext2", "ptb")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", type=Path, required=True, help="depth-pruned model directory")
    parser.add_argument("--pruned-label", default="depth: ppl+ −10 of 30 blocks")
    parser.add_argument("--width", type=Path, default=None, help="width-pruned model (optional)")
    parser.add_argument("--dense", default="smollm2-135m", help="the unpruned reference")
    parser.add_argument("--methods", default="lora,cpt,cpt+lora,distill")
    parser.add_argument("--tokens", type=int, default=16384, help="training budget per method")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr-scale", type=float, default=1.0, help="times the default lr")
    parser.add_argument("--max-windows", type=int, default=32, help="PPL windows per dataset")
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-recovery-bench"))
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args()


def ppl(model, tokenizer, max_windows: int) -> dict[str, float]:
    return {
        name: round(
            perplexity(
                model,
                tokenizer,
                PPLProtocol(name, seq_len=128, max_windows=max_windows),
                progress=False,
            ).ppl,
            3,
        )
        for name in DATASETS
    }


def train_configs(method: str, args: argparse.Namespace) -> tuple[TrainConfig, TrainConfig | None]:
    stages = METHODS.get(method)
    share = args.tokens // len(stages)

    def config(stage: str) -> TrainConfig:
        return TrainConfig(
            tokens=share,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=DEFAULT_LR[stage] * args.lr_scale,
            warmup=0.1,
            save_steps=10_000,
        )

    first = config(stages[0])
    return first, (config("lora") if len(stages) > 1 else None)


def run_one(setting: str, pruned: Path, method: str, args: argparse.Namespace) -> dict:
    train, lora_train = train_configs(method, args)
    start = time.perf_counter()
    out = args.work / f"{setting.split(':')[0]}-{method}"
    result = recover(
        pruned,
        out,
        method=method,
        data="c4",
        train=train,
        lora_train=lora_train,
        teacher=args.dense,
        overwrite=True,
    )
    wall = time.perf_counter() - start
    rec = result.record["recovery"]
    curve = rec["loss_curve"]
    after = ppl(result.model, load_model(pruned)[1], args.max_windows)
    return {
        "setting": setting,
        "method": method,
        "tokens_seen": rec["tokens_seen"],
        "train_wall_s": round(sum(s["wall_s"] for s in rec["stages"]), 1),
        "total_wall_s": round(wall, 1),
        "tokens_per_s": rec["tokens_per_s"],
        "loss_first": round(curve[0]["loss"], 3),
        "loss_last": round(curve[-1]["loss"], 3),
        "lr": {s["method"]: s["config"]["lr"] for s in rec["stages"]},
        "ppl_after": after,
    }


def markdown(results: dict) -> str:
    rows = [
        "| setting | method | tokens | WikiText-2 before → after | PTB before → after "
        "| train loss first → last | train wall (s) | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense = results["dense_ppl"]
    reference = f"{dense['wikitext2']:.2f} | {dense['ptb']:.2f}"
    rows.append(f"| dense (reference) | — | — | {reference} | — | — | — |")
    for run in results["runs"]:
        before = results["before"][run["setting"]]
        wiki = f"{before['wikitext2']:.2f} → {run['ppl_after']['wikitext2']:.2f}"
        ptb = f"{before['ptb']:.2f} → {run['ppl_after']['ptb']:.2f}"
        rows.append(
            f"| {run['setting']} | {run['method']} | {run['tokens_seen']:,} | {wiki} | {ptb} "
            f"| {run['loss_first']:.3f} → {run['loss_last']:.3f} | {run['train_wall_s']:.0f} "
            f"| {run['tokens_per_s']:.0f} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if data_dir() is None:
        raise SystemExit("Set SECATEURS_DATA_DIR to the local data directory.")
    settings = {args.pruned_label: args.pruned}
    if args.width is not None and args.width.is_dir():
        settings["width: magnitude −20%"] = args.width
    else:
        log.warning("No width-pruned model given (--width): width setting skipped.")
    dense, tokenizer = load_model(args.dense)
    results = {
        "protocol": {
            "train_data": "c4 sample minus C4-eval URLs",
            "tokens_per_method": args.tokens,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "warmup": 0.1,
            "scheduler": "cosine",
            "lr_scale": args.lr_scale,
            "ppl": {"seq_len": 128, "bos": "stream", "max_windows": args.max_windows},
            "threads": torch.get_num_threads(),
        },
        "dense_ppl": ppl(dense, tokenizer, args.max_windows),
        "before": {},
        "runs": [],
    }
    del dense
    for setting, pruned in settings.items():
        model, tok = load_model(pruned)
        results["before"][setting] = ppl(model, tok, args.max_windows)
        del model
        for method in args.methods.split(","):
            results["runs"].append(run_one(setting, pruned, method.strip(), args))
            _write(results, args.results)  # partial results survive an interruption
    print(markdown(results))


def _write(results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recovery.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "recovery.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
