"""``secateurs prune``: score, plan, cut and save in one go."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from secateurs.api import ScoreResult, prune
from secateurs.checkpoint import check_output_dir
from secateurs.commands import Command, register
from secateurs.commands.common import (
    add_calibration_args,
    add_criterion_args,
    add_data_args,
    add_model_args,
    calibration_from,
    criterion_options,
)
from secateurs.errors import ConfigError
from secateurs.models import load_model


@register
class Prune(Command):
    path = ("prune",)
    help = "prune a model and save a standard HF checkpoint with secateurs.json"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        add_criterion_args(parser)
        amount = parser.add_mutually_exclusive_group()
        amount.add_argument("--ratio", type=float, help="fraction of units to remove")
        amount.add_argument("--remove", type=int, help="number of units to remove")
        parser.add_argument("--iterative", action="store_true", help="re-score after each removal")
        parser.add_argument("--scores", type=Path, help="reuse scores saved by 'secateurs score'")
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        if args.ratio is None and args.remove is None:
            raise ConfigError("Say how much to remove: --ratio R or --remove N.")
        check_output_dir(args.out, args.overwrite)  # before loading or scoring anything
        scores = ScoreResult.from_dict(json.loads(args.scores.read_text())) if args.scores else None
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        result = prune(
            model, tokenizer, criterion=args.criterion, unit=args.unit, ratio=args.ratio,
            remove=args.remove, protect=args.protect, iterative=args.iterative,
            calibration=calibration_from(args), data_root=args.data_dir, scores=scores,
            out=args.out, overwrite=args.overwrite, source=str(args.model),
            batch_size=args.batch_size, **criterion_options(args),
        )
        params = result.record["parameters"]
        removed = ", ".join(f"{kind} {layer}" for layer, kind in result.plan.units)
        print(f"removed: {removed}")
        print(f"parameters: {params['before']:,} -> {params['after']:,} "
              f"({1 - params['after'] / params['before']:.1%} fewer)")
        print(f"saved: {result.out}")
        return 0
