"""``secateurs eval generate``: greedy continuations of a few fixed prompts, and their repetition.

Like ``eval ppl``, several models run in one process, and a pruned model given together with
the dense model it came from is shown beside it; ``--save`` keeps both in the pruned run's
``results.json`` for ``secateurs report`` and the model card.
"""

from __future__ import annotations

import argparse
from typing import Any

from secateurs.commands.base import Command, register
from secateurs.commands.common import (
    add_model_args,
    add_save_arg,
    dense_of,
    print_json,
    record_source,
    save_dense,
    save_dirs,
)


@register
class EvalGenerate(Command):
    path = ("eval", "generate")
    help = "greedy generations for fixed prompts, with a repetition measure (distinct-2)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from secateurs.evaluate.generate import NEW_TOKENS, PROMPTS

        add_model_args(parser, several=True)
        parser.add_argument(
            "--prompt",
            action="append",
            default=None,
            help=f"a prompt, repeatable (default: {len(PROMPTS)} fixed prompts, e.g. "
            f"{PROMPTS[0]!r})",
        )
        parser.add_argument(
            "--new-tokens",
            type=int,
            default=NEW_TOKENS,
            help="tokens generated per prompt at most (default: %(default)s)",
        )
        parser.add_argument("--json", action="store_true", help="print results as JSON")
        add_save_arg(parser, "generations")

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.errors import ConfigError
        from secateurs.evaluate.generate import PROMPTS, format_plain

        models = [args.model] if isinstance(args.model, str) else list(args.model)
        saves = save_dirs(args, models)
        if args.new_tokens <= 0:
            raise ConfigError(f"--new-tokens must be positive; got {args.new_tokens}.")
        prompts = tuple(args.prompt or PROMPTS)
        runs = {model: _generate(model, prompts, args) for model in models}
        sources = {model: record_source(model) for model in models}
        for model, location in saves.items():
            _save(location, model, runs, dense_of(model, sources))
        if args.json:
            print_json({"models": [{"model": m, **r} for m, r in runs.items()]})
        else:
            print(format_plain(runs))
        return 0


def _generate(model: str, prompts: tuple[str, ...], args: argparse.Namespace) -> dict[str, Any]:
    from secateurs.evaluate.generate import generate_greedy
    from secateurs.models import load_model

    loaded, tokenizer = load_model(model, dtype=args.dtype, device=args.device)
    return generate_greedy(loaded, tokenizer, prompts, args.new_tokens).to_dict()


def _save(location, model: str, runs: dict[str, dict], dense: str | None) -> None:
    from secateurs.report import save_results

    save_results(location, "generations", runs[model])
    if dense is not None:
        save_dense(location, dense, {"generations": runs[dense]})
