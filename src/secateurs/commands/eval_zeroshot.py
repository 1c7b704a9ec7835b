"""``secateurs eval zeroshot``: zero-shot accuracy through lm-evaluation-harness."""

from __future__ import annotations

import argparse

from secateurs.commands.base import Command, register
from secateurs.commands.common import (
    add_data_args,
    add_model_args,
    add_save_arg,
    print_json,
    save_location,
)


@register
class EvalZeroShot(Command):
    path = ("eval", "zeroshot")
    help = (
        "zero-shot accuracy (lm-eval) on boolq, piqa, hellaswag, winogrande, arc, openbookqa; "
        "lambada_openai (accuracy and target perplexity) when named in --tasks"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from secateurs.evaluate.zeroshot import PAPER_TASKS

        add_model_args(parser)
        parser.add_argument(
            "--tasks",
            default=",".join(PAPER_TASKS),
            help="comma-separated tasks (default: the papers' seven; also: lambada_openai)",
        )
        parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--json", action="store_true", help="print results as JSON")
        add_save_arg(parser, "zeroshot")
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.data import require_data
        from secateurs.evaluate.zeroshot import format_table, zeroshot
        from secateurs.models import load_model
        from secateurs.report import save_results

        location = save_location(args)
        require_data("eval zeroshot", args.data_dir)  # before loading the model
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        result = zeroshot(
            model,
            tokenizer,
            args.tasks,
            limit=args.limit,
            batch_size=args.batch_size,
            data_root=args.data_dir,
            seed=args.seed,
        )
        if location is not None:
            save_results(location, "zeroshot", result.to_dict())
        if args.json:
            print_json({"model": str(args.model), "zeroshot": result.to_dict()})
            return 0
        limit = f"limit {args.limit} per task" if args.limit else "full splits"
        print(f"zero-shot, {limit}, {result.protocol['source']}, {result.seconds:.0f}s")
        print(format_table(result))
        return 0
