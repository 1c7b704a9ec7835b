"""``secateurs prune``: score, plan, cut and save in one go."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from secateurs.api import ScoreResult, prune
from secateurs.checkpoint import check_output_dir, read_record
from secateurs.commands import Command, register
from secateurs.commands.common import (
    add_calibration_args,
    add_criterion_args,
    add_data_args,
    add_model_args,
    calibration_from,
    criterion_options,
)
from secateurs.criteria import CRITERIA
from secateurs.errors import ConfigError
from secateurs.models import load_model
from secateurs.width_api import WIDTH_UNITS, WidthOptions, parse_layers


def add_width_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("width (--unit heads|channels|width)")
    group.add_argument("--allocation", default="uniform", choices=("uniform", "global"))
    group.add_argument("--layers", default=None, help="layers that may be pruned, START:STOP")
    group.add_argument("--min-ratio", type=float, default=0.0, help="least fraction per layer")
    group.add_argument("--max-ratio", type=float, default=0.9, help="most fraction per layer")
    group.add_argument("--round-to", type=int, default=1, help="keep channels a multiple of N")
    group.add_argument(
        "--uniform-widths",
        action="store_true",
        help="global scores, one width for every pruned layer (portable config)",
    )
    group.add_argument(
        "--include-embeddings", action="store_true", help="--ratio counts embedding parameters too"
    )
    group.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fold removed units' mean output into the bias (FLAP); default: the criterion's",
    )
    group.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="re-fit kept output-projection columns by damped least squares (default: on)",
    )
    group.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="global allocation sized by per-layer loss sensitivity (default: on)",
    )
    group.add_argument(
        "--reconstruct-damping", type=float, default=0.01, help="ridge λ / mean diag of the Gram"
    )
    group.add_argument(
        "--reconstruct-samples", type=int, default=64, help="calibration windows for the fit"
    )


def _report_width(result) -> int:
    params = result.record["parameters"]
    print(f"kept head groups per layer: {list(result.plan.kept('heads'))}")
    print(f"kept MLP channels per layer: {list(result.plan.kept('channels'))}")
    print(
        f"parameters: {params['before']:,} -> {params['after']:,}; removed "
        f"{params['achieved_ratio']:.4%} of the {params['base']:,} counted "
        f"(asked {params['asked_ratio']:.2%})"
    )
    print(f"loading: {read_record(result.out).get('loading', {}).get('how', '')}")
    print(f"saved: {result.out}")
    return 0


@register
class Prune(Command):
    path = ("prune",)
    help = "prune a model and save a standard HF checkpoint with secateurs.json"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        add_criterion_args(parser)
        amount = parser.add_mutually_exclusive_group()
        amount.add_argument(
            "--ratio",
            type=float,
            help="depth: fraction of units to remove; width (--unit heads|channels|width): "
            "fraction of the parameters (non-embedding unless --include-embeddings)",
        )
        amount.add_argument("--remove", type=int, help="number of units to remove")
        parser.add_argument("--iterative", action="store_true", help="re-score after each removal")
        parser.add_argument("--scores", type=Path, help="reuse scores saved by 'secateurs score'")
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_width_args(parser)
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        if args.ratio is None and args.remove is None:
            raise ConfigError("Say how much to remove: --ratio R or --remove N.")
        if args.unit in WIDTH_UNITS:  # validate width options before loading anything
            CRITERIA.canonical(args.criterion.rstrip("+"))
            WidthOptions(
                args.unit,
                args.ratio if args.ratio is not None else -1.0,
                args.allocation,
                parse_layers(args.layers),
                args.min_ratio,
                args.max_ratio,
                args.round_to,
                args.uniform_widths,
                reconstruct=args.reconstruct,
                reconstruct_damping=args.reconstruct_damping,
                reconstruct_samples=args.reconstruct_samples,
                sensitivity=args.sensitivity,
            )
        check_output_dir(args.out, args.overwrite)  # before loading or scoring anything
        scores = ScoreResult.from_dict(json.loads(args.scores.read_text())) if args.scores else None
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device)
        width = {}
        if args.unit in WIDTH_UNITS:
            width = dict(
                allocation=args.allocation,
                layers=args.layers,
                min_ratio=args.min_ratio,
                max_ratio=args.max_ratio,
                round_to=args.round_to,
                uniform_widths=args.uniform_widths,
                include_embeddings=args.include_embeddings,
                compensate=args.compensate,
                reconstruct=args.reconstruct,
                reconstruct_damping=args.reconstruct_damping,
                reconstruct_samples=args.reconstruct_samples,
                sensitivity=args.sensitivity,
            )
        result = prune(
            model,
            tokenizer,
            criterion=args.criterion,
            unit=args.unit,
            ratio=args.ratio,
            remove=args.remove,
            protect=args.protect,
            iterative=args.iterative,
            calibration=calibration_from(args),
            data_root=args.data_dir,
            scores=scores,
            out=args.out,
            overwrite=args.overwrite,
            source=str(args.model),
            batch_size=args.batch_size,
            **width,
            **criterion_options(args),
        )
        if args.unit in WIDTH_UNITS:
            return _report_width(result)
        params = result.record["parameters"]
        removed = ", ".join(f"{kind} {layer}" for layer, kind in result.plan.units)
        print(f"removed: {removed}")
        print(
            f"parameters: {params['before']:,} -> {params['after']:,} "
            f"({1 - params['after'] / params['before']:.1%} fewer)"
        )
        print(f"saved: {result.out}")
        return 0
