"""``secateurs report``: a markdown page with tables and plots from run directories."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.commands.base import Command, register


@register
class Report(Command):
    path = ("report",)
    help = "markdown report with PNG plots (importance, PPL vs parameters, latency/throughput)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "runs", nargs="*", type=Path, help="model directories (secateurs.json, results.json)"
        )
        parser.add_argument(
            "--bench",
            action="append",
            type=Path,
            default=[],
            help="JSON written by 'secateurs bench --json'; repeatable",
        )
        parser.add_argument("--out", type=Path, required=True, help="output folder")
        parser.add_argument("--title", default="secateurs report")

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.report import build_report

        page = build_report(args.runs, args.bench, args.out, title=args.title)
        print(f"report: {page}")
        return 0
