"""SmolLM2-135M dense vs depth-pruned (and width-pruned) models: speed, and zero-shot accuracy.

Measures generation latency / throughput (128 new tokens, Shortened LLaMA's protocol) of every
model in one process, interleaved, and sets the measured speedup next to the ideal one (ratio of
per-token MACs); then zero-shot accuracy (seven tasks, ``--zeroshot-limit`` documents each) of
the dense model and the 20% depth model. Writes JSON + a markdown table.

    python benchmarks/efficiency.py --depth /tmp/d6 /tmp/d10 --zeroshot-model /tmp/d6
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from secateurs.checkpoint import write_json
from secateurs.commands.bench import int_list
from secateurs.evaluate.efficiency import BenchConfig, benchmark, load_candidate
from secateurs.evaluate.zeroshot import PAPER_TASKS, zeroshot

log = logging.getLogger("benchmarks.efficiency")
OUT = Path(__file__).parent / "results" / "efficiency"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", default="smollm2-135m")
    parser.add_argument("--depth", nargs="*", default=[], help="depth-pruned model directories")
    parser.add_argument("--width", nargs="*", default=[], help="width-pruned model directories")
    parser.add_argument("--batch-sizes", type=int_list, default=(1, 16))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--zeroshot-model", default=None, help="the 20%% depth model to evaluate")
    parser.add_argument("--zeroshot-limit", type=int, default=100)
    parser.add_argument("--no-speed", action="store_true", help="zero-shot only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT, help="writes OUT.json and OUT.md")
    return parser.parse_args()


def speed(args: argparse.Namespace) -> dict:
    specs = [args.dense, *args.depth, *args.width]
    candidates = [load_candidate(spec) for spec in specs]
    config = BenchConfig(args.batch_sizes, args.new_tokens, repeats=args.repeats)
    return benchmark(candidates, config)


def accuracy(args: argparse.Namespace) -> dict[str, dict]:
    from secateurs.models import load_model

    results = {}
    for spec in [args.dense, args.zeroshot_model]:
        model, tokenizer = load_model(spec)
        result = zeroshot(model, tokenizer, PAPER_TASKS, limit=args.zeroshot_limit, batch_size=16)
        results[Path(spec).name] = result.to_dict()
        del model
    return results


def speed_table(bench: dict) -> str:
    batches = bench["protocol"]["batch_sizes"]
    head = ["model", "kind", "params (M)", "GMACs/token", "ideal speedup"]
    for b in batches:
        head += [f"B={b} latency (s)", f"B={b} tokens/s", f"B={b} speedup"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for m in bench["models"]:
        cells = [
            m["name"],
            m["kind"],
            f"{m['parameters'] / 1e6:.1f}",
            f"{m['macs_per_token'] / 1e9:.4f}",
            f"{m['ideal_speedup']:.2f}×",
        ]
        rows = {r["batch_size"]: r for r in m["results"]}
        for b in batches:
            r = rows[b]
            if r["status"] != "ok":
                cells += [r["status"]] * 3
                continue
            cells += [f"{r['latency_s']:.2f}", f"{r['throughput_tok_s']:.1f}"]
            cells += [f"{r['speedup']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_table(results: dict[str, dict]) -> str:
    names = list(results)
    lines = ["| task (metric) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for task in PAPER_TASKS:
        metric = next(iter(results.values()))["protocol"]["metric"][task]
        values = [f"{r['scores'][task]:.3f}" for r in results.values()]
        lines.append(f"| {task} ({metric}) | " + " | ".join(values) + " |")
    means = [f"**{r['mean']:.3f}**" for r in results.values()]
    lines.append("| **mean** | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # a shared machine: fewer threads, fewer stalls
    report: dict = {}
    markdown: list[str] = []
    if not args.no_speed:
        report["speed"] = bench = speed(args)
        markdown += [
            f"## Speed: {args.new_tokens} new tokens, {bench['protocol']['device']}, "
            f"{bench['protocol']['threads']} threads, median of {args.repeats}\n",
            speed_table(bench),
        ]
        _write(args.out, report, markdown)  # speed first: zero-shot takes longer
    if args.zeroshot_model:
        report["zeroshot"] = accuracy(args)
        markdown += [
            f"\n## Zero-shot (lm-eval, {args.zeroshot_limit} documents per task)\n",
            accuracy_table(report["zeroshot"]),
        ]
    print(_write(args.out, report, markdown))


def _write(out: Path, report: dict, markdown: list[str]) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out.with_suffix(".json"), report)
    text = "\n".join(markdown) + "\n"
    out.with_suffix(".md").write_text(text)
    log.info("wrote %s.json / .md", out)
    return text


if __name__ == "__main__":
    main()
