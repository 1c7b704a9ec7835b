"""``secateurs export``: write a (pruned) checkpoint in a format an engine loads."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.commands.base import Command, register
from secateurs.export import EXPORTS


@register
class Export(Command):
    path = ("export",)
    help = "export a checkpoint for an engine: hf, decilm (vLLM, SGLang, TRT-LLM), gguf (llama.cpp)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "model",
            help="local checkpoint directory (e.g. from 'secateurs prune'), .gguf file or alias",
        )
        parser.add_argument("--to", required=True, choices=EXPORTS.names(), help="output format")
        parser.add_argument(
            "--out", type=Path, required=True, help="output directory (.gguf file for gguf)"
        )
        parser.add_argument(
            "--dtype", default="f16", choices=("f16", "f32"), help="gguf tensor type"
        )
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.export import check_export, export

        fmt, layout = check_export(args.model, args.to)
        out = export(args.model, args.to, args.out, overwrite=args.overwrite, dtype=args.dtype)
        print(f"exported: {out}")
        print(f"loads in: {', '.join(fmt.engines_for(layout))}")
        return 0
