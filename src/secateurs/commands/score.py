"""``secateurs score``: score units only and save the scores (reusable by ``prune --scores``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.commands import Command, register
from secateurs.commands.common import (
    add_calibration_args,
    add_criterion_args,
    add_data_args,
    add_model_args,
    calibration_from,
    criterion_options,
)
from secateurs.errors import OutputExistsError


@register
class Score(Command):
    path = ("score",)
    help = "score every layer's units with a criterion and save them as JSON"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        add_criterion_args(parser)
        parser.add_argument("--out", type=Path, required=True, help="output JSON file")
        parser.add_argument("--overwrite", action="store_true")
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.api import CriterionSpec, save_scores, score_units
        from secateurs.commands.common import check_data_needs
        from secateurs.models import load_model

        if args.out.exists() and not args.overwrite:
            raise OutputExistsError(f"{args.out} exists; pass --overwrite to replace it.")
        spec = CriterionSpec.parse(args.criterion, args.protect)
        check_data_needs(args)
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, require_adapter=True
        )
        result = score_units(
            model,
            tokenizer,
            spec.name,
            args.unit,
            calibration=calibration_from(args),
            data_root=args.data_dir,
            batch_size=args.batch_size,
            **criterion_options(args),
        )
        save_scores(result, args.out, {"source_model": str(args.model)})
        ranked = sorted(range(len(result.values)), key=lambda i: result.values[i])
        print(f"{spec.name} scores of {args.unit}s ({result.seconds:.1f}s), least important first:")
        for layer in ranked:
            print(f"  layer {layer:3d}  {result.values[layer]:.6g}")
        print(f"saved: {args.out}")
        return 0
