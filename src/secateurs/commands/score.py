"""``secateurs score``: score units only and save the scores (reusable by ``prune --scores``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.commands.base import Command, register
from secateurs.commands.common import add_data_args, add_model_args
from secateurs.commands.spec_args import add_calibration_args, add_unit_args, spec_from_args
from secateurs.errors import OutputExistsError


@register
class Score(Command):
    path = ("score",)
    help = "score every layer's units with a criterion and save them as JSON"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        add_unit_args(parser)
        parser.add_argument("--out", type=Path, required=True, help="output JSON file")
        parser.add_argument("--overwrite", action="store_true")
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        if args.out.exists() and not args.overwrite:
            raise OutputExistsError(f"{args.out} exists; pass --overwrite to replace it.")
        spec = spec_from_args(args, remove=1)  # a budget is never used: scores only
        from secateurs.data import require_data
        from secateurs.preflight import check_source

        check_source(spec, args.model, budget=False)  # before torch is imported
        if spec.data.calibration == "c4":
            require_data("C4 calibration", spec.data.data_dir)
        from secateurs.run import score
        from secateurs.scores import save_scores

        result = score(args.model, spec)
        save_scores(result, args.out, {"source_model": str(args.model)})
        ranked = sorted(range(len(result.values)), key=lambda i: result.values[i])
        unit = spec.units[0]
        print(
            f"{result.criterion} scores of {unit}s ({result.seconds:.1f}s), least important first:"
        )
        for layer in ranked:
            print(f"  layer {layer:3d}  {result.values[layer]:.6g}")
        print(f"saved: {args.out}")
        return 0
