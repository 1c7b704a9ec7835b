"""``secateurs bench``: parameters, MACs, latency, throughput and peak memory, side by side."""

from __future__ import annotations

import argparse
from pathlib import Path

from secateurs.checkpoint import write_json
from secateurs.commands.base import Command, register
from secateurs.commands.common import add_save_arg, device_arg, dtype_arg, save_dirs, save_speed
from secateurs.errors import ConfigError


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers like 1,4,16; got {text!r}") from err


def check_inputs(args: argparse.Namespace) -> None:
    """Before torch is imported and any model loaded: every model's files (a damaged one is
    named before the others are loaded), and a prompt + new tokens beyond a learned position
    table, from config.json (other models are checked once loaded or built, where rotary
    models get their warning, once)."""
    from secateurs.checkpoint import read_config_dict
    from secateurs.models import check_model_files
    from secateurs.positions import check_generation

    for spec in args.models:
        check_model_files(spec, shapes=False)
        if Path(spec).is_dir():
            check_generation(args.prompt_len, args.new_tokens, read_config_dict(spec), spec)


@register
class Bench(Command):
    path = ("bench",)
    help = "generation latency / throughput / peak memory of several models, interleaved"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from secateurs.evaluate.bench_protocol import BenchConfig

        parser.add_argument(
            "models", nargs="*", help="HF directories, hub ids, .gguf files or aliases to measure"
        )
        _add_protocol_args(parser, BenchConfig())
        _add_model_args(parser)
        add_save_arg(parser, "speed")

    def run(self, args: argparse.Namespace) -> int:
        if not args.models and not args.random_config:
            raise ConfigError("Give models to measure, or --random-config NAME.")
        check_inputs(args)
        import torch

        from secateurs.evaluate.efficiency import (
            BenchConfig,
            benchmark,
            check_positions,
            format_table,
            load_candidate,
            random_candidates,
            random_config,
        )

        saves = save_dirs(args, list(args.models))
        config = BenchConfig(
            args.batch_sizes, args.new_tokens, args.prompt_len, args.repeats, args.warmup, args.seed
        )
        for name in args.random_config:  # before building the random models
            check_positions(random_config(name), config, name)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        candidates = [load_candidate(spec, args.dtype, device) for spec in args.models]
        dtype = getattr(torch, args.dtype) if args.dtype not in (None, "auto") else torch.float32
        for name in args.random_config:
            depths = (0, *args.plan_depth)
            candidates += random_candidates(name, depths, dtype, device, args.seed)
        result = benchmark(candidates, config)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            write_json(args.json, result)
        save_speed(saves, result)
        print(format_table(result))
        return 0


def _add_protocol_args(parser: argparse.ArgumentParser, defaults) -> None:
    """What is measured: batch sizes, tokens, repeats, the prompt seed."""
    parser.add_argument(
        "--batch-sizes",
        type=int_list,
        default=defaults.batch_sizes,
        metavar="N,M,...",
        help=f"batch sizes to measure (default: {','.join(map(str, defaults.batch_sizes))})",
    )
    parser.add_argument(
        "--new-tokens",
        type=int,
        default=defaults.new_tokens,
        help="tokens generated per sequence (default: %(default)s)",
    )
    parser.add_argument(
        "--prompt-len",
        type=int,
        default=defaults.prompt_len,
        help="prompt tokens per sequence (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=defaults.repeats,
        help="timed runs per model and batch size; the median is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=defaults.warmup,
        help="untimed runs first (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="prompt seed (default: %(default)s)"
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """How the models run and what else is measured."""
    parser.add_argument(
        "--dtype", type=dtype_arg, default=None, help="float32 (default), bfloat16, float16"
    )
    parser.add_argument(
        "--device", type=device_arg, default=None, help="default: cuda if present, else cpu"
    )
    parser.add_argument(
        "--random-config",
        action="append",
        default=[],
        metavar="NAME_OR_JSON",
        help="also measure a random-weight model of this shape (llama-7b, smollm2-135m, "
        "or a config.json); repeatable",
    )
    parser.add_argument(
        "--plan-depth",
        type=int_list,
        default=(),
        metavar="N[,M]",
        help="with --random-config: also measure it with N (and M ...) blocks removed "
        "(default: none)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: as the global --threads: the idle cores)",
    )
    parser.add_argument(
        "--json", type=Path, help="also write the results to this JSON file (default: no file)"
    )
