"""``secateurs prune``: flags → one ``PruneSpec`` → ``secateurs.run.prune`` → a summary."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from secateurs.commands.base import Command, register
from secateurs.commands.common import add_data_args, add_model_args
from secateurs.commands.spec_args import (
    add_allocation_args,
    add_budget_args,
    add_calibration_args,
    add_fit_args,
    add_mode_args,
    add_selection_args,
    add_unit_args,
    spec_from_args,
)


@register
class Prune(Command):
    path = ("prune",)
    help = "prune a model and save a standard HF checkpoint with secateurs.json"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_model_args(parser)
        add_unit_args(parser)
        add_budget_args(parser)
        add_selection_args(parser)
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_fit_args(parser)
        add_allocation_args(parser)
        add_mode_args(parser)
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.outputs import check_output_dir
        from secateurs.preflight import check_source

        spec = spec_from_args(args)  # every flag checked before anything is read
        check_output_dir(args.out, args.overwrite)
        check_source(spec, args.model)  # config.json and the files, before torch is imported
        _check_data(spec)
        from secateurs.run import prune

        argv = shlex.join(["secateurs", *sys.argv[1:]])
        result = prune(args.model, spec, out=args.out, overwrite=args.overwrite, argv=argv)
        _report(result)
        return 0


def _check_data(spec) -> None:
    """C4 calibration needs a data directory or a reachable hub (checked before loading)."""
    from secateurs.data import require_data

    if spec.needs_windows and spec.data.calibration == "c4":
        require_data("C4 calibration", spec.data.data_dir)


def _report(result) -> None:
    """What ``prune`` prints for any plan: each part's units, the parameters, how to load."""
    plan, record = result.plan, result.record
    params = record["parameters"]
    if plan.has_depth or plan.is_empty:
        removed = ", ".join(f"{kind} {layer}" for layer, kind in plan.units) or "nothing"
        print(f"removed: {removed}")
    if plan.has_widths:
        print(f"kept head groups per layer: {list(plan.kept('heads'))}")
        print(f"kept MLP channels per layer: {list(plan.kept('channels'))}")
    if plan.has_experts:
        kept = [plan.kept("experts")[i] for i in plan.expert_layers]
        print(f"kept experts per MoE layer {list(plan.expert_layers)}: {kept}")
    line = f"parameters: {params['before']:,} -> {params['after']:,}"
    line += f"; removed {params['achieved_ratio']:.4%} of the {params['base']:,} counted"
    if params.get("asked_ratio") is not None:
        line += f" (asked {params['asked_ratio']:.2%})"
    print(line)
    session = record.get("session", {})
    if session.get("name") != "memory":
        print(f"peak memory: {record['timings']['peak_rss_mb']:,} MB (read {session.get('name')})")
    print(f"loading: {record.get('loading', {}).get('how', '')}")
    print(f"saved: {result.out}")
