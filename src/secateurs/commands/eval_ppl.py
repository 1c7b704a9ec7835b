"""``secateurs eval ppl``: perplexity with the papers' protocol."""

from __future__ import annotations

import argparse

from secateurs.commands import Command, register
from secateurs.commands.common import (
    add_data_args,
    add_model_args,
    add_save_arg,
    print_json,
    save_location,
)
from secateurs.evaluate.ppl import BOS_POLICIES, PPLProtocol, perplexity
from secateurs.models import load_model
from secateurs.report import read_results, save_results


@register
class EvalPPL(Command):
    path = ("eval", "ppl")
    help = "perplexity on wikitext2 / ptb / c4 (non-overlapping windows, remainder dropped)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        parser.add_argument(
            "--dataset", default="wikitext2", help="comma-separated: wikitext2,ptb,c4"
        )
        parser.add_argument("--split", default=None, help="default: the papers' split per dataset")
        parser.add_argument("--seq-len", type=int, default=128)
        parser.add_argument("--bos", default="stream", choices=BOS_POLICIES)
        parser.add_argument(
            "--max-windows", type=int, default=None, help="evaluate at most N windows"
        )
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--json", action="store_true", help="print results as JSON")
        add_save_arg(parser, "ppl")
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        location = save_location(args)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        results = {}
        for dataset in [d.strip() for d in args.dataset.split(",") if d.strip()]:
            protocol = PPLProtocol(
                dataset, args.split, args.seq_len, args.bos, args.max_windows, args.batch_size
            )
            results[dataset] = perplexity(model, tokenizer, protocol, args.data_dir).to_dict()
        if location is not None:
            saved = {**read_results(location).get("ppl", {}), **results}
            save_results(location, "ppl", saved)
        if args.json:
            print_json({"model": str(args.model), "results": results})
            return 0
        print(f"{'dataset':<10} {'ppl':>10} {'windows':>9} {'tokens':>9}  protocol")
        for name, r in results.items():
            p = r["protocol"]
            print(
                f"{name:<10} {r['ppl']:>10.3f} {r['windows']:>9} {r['tokens']:>9}  "
                f"{p['split']}, seq_len={p['seq_len']}, bos={p['bos']}"
            )
        return 0
