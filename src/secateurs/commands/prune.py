"""``secateurs prune``: score, plan, cut and save in one go."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from secateurs.checkpoint import check_output_dir, read_record
from secateurs.commands import Command, register
from secateurs.commands.common import (
    add_calibration_args,
    add_criterion_args,
    add_data_args,
    add_model_args,
    calibration_from,
    check_data_needs,
    criterion_options,
)
from secateurs.defaults import DEFAULT_SHORTLIST, DEPTH_SHARE, HEAL_SAMPLES, HEAL_TARGETS
from secateurs.errors import ConfigError
from secateurs.targets import TARGETS, width_constraints


def add_width_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "width (--unit heads|channels|width), depth + width (--unit block,width) and experts"
    )
    group.add_argument(
        "--allocation",
        default="uniform",
        choices=("uniform", "global"),
        help="uniform: same share per layer; global: rank all layers' units together",
    )
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
        "--target",
        choices=TARGETS.names(),
        help="keep the pruned shapes servable by this engine (see docs/export.md)",
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
        help="global allocation sized by per-layer loss sensitivity (default: on, except for "
        "criteria scoring predicted loss changes, e.g. influence: ranked per parameter)",
    )
    group.add_argument(
        "--reconstruct-damping", type=float, default=0.01, help="ridge λ / mean diag of the Gram"
    )
    group.add_argument(
        "--reconstruct-samples", type=int, default=64, help="calibration windows for the fit"
    )
    group.add_argument(
        "--depth-share",
        type=float,
        default=DEPTH_SHARE,
        help="--unit block,width: share of the --ratio budget removed as whole blocks "
        "(%(default)s); width takes the rest",
    )


def _report(result) -> int:
    """What ``prune`` prints for any plan: each part's units, the parameters, how to load."""
    plan, params = result.plan, result.record["parameters"]
    if plan.has_depth or plan.is_empty:
        removed = ", ".join(f"{kind} {layer}" for layer, kind in plan.units) or "nothing"
        print(f"removed: {removed}")
    if plan.has_widths:
        print(f"kept head groups per layer: {list(plan.kept('heads'))}")
        print(f"kept MLP channels per layer: {list(plan.kept('channels'))}")
    if plan.has_experts:
        _print_kept_experts(plan)
    line = f"parameters: {params['before']:,} -> {params['after']:,}"
    if "achieved_ratio" in params:
        line += (
            f"; removed {params['achieved_ratio']:.4%} of the {params['base']:,} counted "
            f"(asked {params['asked_ratio']:.2%})"
        )
    else:
        line += f" ({1 - params['after'] / params['before']:.1%} fewer)"
    print(line)
    print(f"loading: {read_record(result.out).get('loading', {}).get('how', '')}")
    print(f"saved: {result.out}")
    return 0


def _bytes(model) -> int:
    from secateurs.checkpoint import checkpoint_bytes

    return checkpoint_bytes(model)


def check_experts_config(model: str) -> None:
    """Refuse --unit experts on a dense (or unsupported MoE) model from its config.json alone."""
    if not (Path(model) / "config.json").is_file():
        return
    from secateurs.adapters import adapter_for
    from secateurs.checkpoint import read_config
    from secateurs.experts import expert_layout

    config = read_config(model)
    expert_layout(adapter_for(config), config)


def _shortlist(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--shortlist takes a count or 'all', not {text!r}"
        ) from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--shortlist must be >= 0; got {value}")
    return value


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("explicit depth selection (no scoring)")
    group.add_argument("--blocks", help="remove these blocks, e.g. 12,13,14,16,17,18")
    group.add_argument("--attn", help="remove these layers' attention branches")
    group.add_argument("--mlp", help="remove these layers' MLP branches")
    group.add_argument("--plan", type=Path, help="a plan JSON (or another run's secateurs.json)")
    group.add_argument(
        "--stream",
        action="store_true",
        help="with --blocks/--plan on a local safetensors checkpoint: copy the kept tensors "
        "without loading the model (models larger than memory)",
    )


def _stream(args: argparse.Namespace) -> int:
    """``--stream``: explicit blocks, no scoring, no model in memory."""
    from secateurs.api import stream_prune

    if args.unit != "block" or args.attn is not None or args.mlp is not None:
        raise ConfigError("--stream removes whole blocks (--unit block with --blocks or --plan).")
    if args.blocks is None and args.plan is None:
        raise ConfigError("--stream needs the blocks to remove: --blocks 12,13 or --plan FILE.")
    if any(x is not None for x in (args.ratio, args.remove, args.params, args.scores)):
        raise ConfigError("--stream takes an explicit --blocks/--plan, not --ratio/--remove.")
    if not Path(args.model).is_dir():
        raise ConfigError(f"--stream needs a local checkpoint directory; {args.model} is not one.")
    out = stream_prune(
        args.model, args.out, blocks=args.blocks, plan=args.plan, overwrite=args.overwrite
    )
    record = read_record(out)
    print(f"removed: blocks {list(record['plan']['blocks'])}")
    return _report_streamed(record, out, "streamed")


def _report_streamed(record: dict, out: Path, how: str) -> int:
    """What a run that never held the model prints: sizes, its peak memory, how to load it."""
    params = record["parameters"]
    print(f"parameters: {params['before']:,} -> {params['after']:,}")
    print(f"peak memory: {record['timings']['peak_rss_mb']:,} MB ({how})")
    print(f"loading: {record.get('loading', {}).get('how', '')}")
    print(f"saved: {out}")
    return 0


def width_options(args: argparse.Namespace):
    """The ``WidthOptions`` of the width flags, validated on creation (before any loading)."""
    from secateurs.width_api import WidthOptions, parse_layers

    if args.ratio is None:
        raise ConfigError("Width pruning takes --ratio (a fraction of the parameters).")
    return WidthOptions(
        width_unit(args.unit),
        args.ratio,
        args.allocation,
        parse_layers(args.layers),
        args.min_ratio,
        args.max_ratio,
        args.round_to,
        args.uniform_widths,
        args.include_embeddings,
        compensate=args.compensate,
        reconstruct=args.reconstruct,
        reconstruct_damping=args.reconstruct_damping,
        reconstruct_samples=args.reconstruct_samples,
        sensitivity=args.sensitivity,
    )


def width_unit(unit: str) -> str:
    """The width kind of ``--unit`` (``block,width`` → ``width``)."""
    from secateurs.api import combined_units

    combined = combined_units(unit)
    return combined[1] if combined else unit


def is_width(unit: str) -> bool:
    """``--unit`` prunes width (alone or with blocks)."""
    from secateurs.width_api import WIDTH_UNITS

    return width_unit(unit) in WIDTH_UNITS


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models larger than memory")
    group.add_argument(
        "--sequential",
        action="store_true",
        help="score one layer at a time read from disk, then stream the surgery to --out "
        "(memory: one layer + calibration activations; safetensors checkpoints)",
    )
    group.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="take the --sequential path when loading the model whole would need more than "
        "this (default: 80%% of the memory available)",
    )
    group.add_argument(
        "--offload-dir",
        type=Path,
        default=None,
        help="--sequential ppl / mini-llm: keep the perturbed activation streams in files here "
        "(default: in memory, or a temporary folder beside --out when they would not fit)",
    )


def _wants_sequential(args: argparse.Namespace) -> bool:
    """``--sequential``, or a local checkpoint too large to load whole: larger than
    ``--max-memory`` if given, else than 80% of the memory available now."""
    if args.sequential:
        return True
    if args.stream or not (Path(args.model) / "config.json").is_file():
        return False
    import torch

    from secateurs.lazy import available_memory, bytes_to_load
    from secateurs.streaming import CheckpointReader

    try:
        CheckpointReader(args.model)
    except ConfigError:  # not safetensors: only the in-memory path reads it
        return False
    dtype = getattr(torch, args.dtype or "float32", torch.float32)
    need = bytes_to_load(args.model, dtype if isinstance(dtype, torch.dtype) else torch.float32)
    budget = args.max_memory * 2**30 if args.max_memory else 0.8 * available_memory()
    if need <= budget:
        return False
    print(f"{args.model} needs {need / 2**30:.1f} GiB in memory (budget {budget / 2**30:.1f} "
          "GiB): scoring layer by layer (--sequential).")  # fmt: skip
    return True


def _sequential(args: argparse.Namespace) -> int:
    """``--sequential``: layer-by-layer scoring, streamed surgery (no model in memory)."""
    from secateurs.sequential import sequential_prune
    from secateurs.width_api import WIDTH_UNITS

    if args.blocks is not None or args.plan is not None:
        return _stream(args)  # an explicit selection needs no scoring at all
    unsupported = [
        flag
        for flag, used in (
            ("--iterative", args.iterative),
            ("--heal", args.heal),
            ("--scores", args.scores is not None),
            ("--target", args.target is not None),
        )
        if used
    ]
    if unsupported:
        raise ConfigError(f"--sequential does not take {', '.join(unsupported)} (yet).")
    if args.unit not in ("block", "experts", *WIDTH_UNITS):
        raise ConfigError("--sequential prunes --unit block, experts or heads|channels|width.")
    if args.unit == "experts":  # validate before anything is read
        from secateurs.experts_api import ExpertOptions

        ExpertOptions(args.ratio, args.remove, args.allocation)
        check_experts_config(args.model)
    if not Path(args.model).is_dir():
        raise ConfigError(f"--sequential needs a local checkpoint directory; {args.model} is not.")
    check_output_dir(args.out, args.overwrite)
    check_data_needs(args)
    import torch

    if (args.dtype or "float32") not in ("float32", "bfloat16", "float16"):
        raise ConfigError("--sequential computes in --dtype float32, bfloat16 or float16.")
    dtype = getattr(torch, args.dtype or "float32")
    common = dict(
        criterion=args.criterion,
        calibration=calibration_from(args),
        data_root=args.data_dir,
        overwrite=args.overwrite,
        batch_size=max(args.batch_size, 8),
        dtype=dtype,
        device=args.device,
        offload_dir=args.offload_dir,
        **criterion_options(args),
    )
    if args.unit == "experts":
        return _sequential_experts(args, common)
    if args.unit == "block":
        count = args.remove if args.remove is not None else None
        if count is None and args.ratio is not None:
            from secateurs.streaming import meta_skeleton

            count = round(args.ratio * meta_skeleton(args.model).config.num_hidden_layers)
        record = sequential_prune(
            args.model, args.out, unit="block", remove=count, protect=args.protect, **common
        )
        print(f"removed: blocks {record['plan']['blocks']}")
    else:
        width = width_options(args)
        record = sequential_prune(args.model, args.out, unit=args.unit, width=width, **common)
    return _report_streamed(record, args.out, "layer by layer")


def _sequential_experts(args: argparse.Namespace, common: dict) -> int:
    """``--sequential --unit experts``: experts scored and cut one layer at a time."""
    from secateurs.experts_api import ExpertOptions
    from secateurs.plan import Plan
    from secateurs.sequential_experts import sequential_prune_experts

    options = ExpertOptions(args.ratio, args.remove, args.allocation)
    common = {key: value for key, value in common.items() if key != "offload_dir"}
    record = sequential_prune_experts(args.model, args.out, options=options, **common)
    _print_kept_experts(Plan.from_dict(record["plan"]))
    return _report_streamed(record, args.out, "layer by layer")


def _print_kept_experts(plan) -> None:
    kept = [plan.kept("experts")[i] for i in plan.expert_layers]
    print(f"kept experts per MoE layer {list(plan.expert_layers)}: {kept}")


def depth_extras(args: argparse.Namespace) -> dict:
    """Depth-only API arguments (explicit selection, sub-block budget, search, healing)."""
    from secateurs.width_api import WIDTH_UNITS

    if args.unit in WIDTH_UNITS or args.unit == "experts":
        return {}
    if is_width(args.unit):
        return dict(depth_share=args.depth_share)
    return dict(
        blocks=args.blocks,
        attn=args.attn,
        mlp=args.mlp,
        plan=args.plan,
        params=args.params,
        shortlist=args.shortlist,
        heal=args.heal,
        heal_samples=args.heal_samples,
        heal_bias=args.heal_bias,
        heal_target=args.heal_target,
    )


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
            "fraction of the parameters (non-embedding unless --include-embeddings); "
            "experts: fraction of the routed experts",
        )
        amount.add_argument(
            "--remove",
            type=int,
            help="number of units to remove (experts: per MoE layer; --unit subblock: that many "
            "blocks' parameters)",
        )
        amount.add_argument(
            "--params", type=int, help="--unit subblock: parameters to remove (attn/MLP branches)"
        )
        parser.add_argument("--iterative", action="store_true", help="re-score after each removal")
        parser.add_argument(
            "--shortlist",
            type=_shortlist,
            default=DEFAULT_SHORTLIST,
            help="greedy ppl search: candidates re-scored per step after the first "
            f"(default {DEFAULT_SHORTLIST}; 'all' = exact greedy)",
        )
        parser.add_argument(
            "--heal",
            action="store_true",
            help="fit a least-squares correction of removed blocks into the preceding down_proj",
        )
        parser.add_argument(
            "--heal-samples",
            type=int,
            default=HEAL_SAMPLES,
            help=f"calibration windows for --heal (default {HEAL_SAMPLES})",
        )
        parser.add_argument(
            "--heal-bias",
            action="store_true",
            help="--heal also fits a down_proj bias (turns on LLaMA's mlp_bias)",
        )
        parser.add_argument(
            "--heal-target",
            default="local",
            choices=HEAL_TARGETS,
            help="local: the removed run's own contribution; dense: the dense model's stream",
        )
        add_selection_args(parser)
        parser.add_argument("--scores", type=Path, help="reuse scores saved by 'secateurs score'")
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        add_width_args(parser)
        add_memory_args(parser)
        add_calibration_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        from secateurs.api import ScoreResult, prune
        from secateurs.criteria import CRITERIA
        from secateurs.experts_api import ExpertOptions
        from secateurs.models import load_model
        from secateurs.outputs import check_disk_space

        explicit = any(x is not None for x in (args.blocks, args.attn, args.mlp, args.plan))
        if args.ratio is None and args.remove is None and args.params is None and not explicit:
            raise ConfigError(
                "Say what to remove: --ratio R, --remove N, --params P, or an explicit "
                "--blocks/--attn/--mlp/--plan."
            )
        if args.stream:
            return _stream(args)
        if _wants_sequential(args):
            return _sequential(args)
        if args.target is not None and not is_width(args.unit):
            raise ConfigError("--target constrains width pruning (--unit heads|channels|width).")
        if is_width(args.unit):  # validate width options before loading anything
            for name in args.criterion.split(","):
                CRITERIA.canonical(name.strip().rstrip("+"))
            vars(args).update(
                width_constraints(
                    args.target,
                    unit=width_unit(args.unit),
                    allocation=args.allocation,
                    layers=args.layers,
                    round_to=args.round_to,
                    uniform_widths=args.uniform_widths,
                    compensate=args.compensate,
                )
            )
            width_options(args)
        if args.unit == "experts":  # validate before loading anything
            ExpertOptions(args.ratio, args.remove, args.allocation)
            check_experts_config(args.model)
        check_output_dir(args.out, args.overwrite)  # before loading or scoring anything
        scores = ScoreResult.from_dict(json.loads(args.scores.read_text())) if args.scores else None
        if scores is None and not (explicit and not args.heal):  # an explicit cut reads no data
            check_data_needs(args)
        model, tokenizer = load_model(
            args.model, dtype=args.dtype, device=args.device, require_adapter=True
        )
        check_disk_space(args.out, _bytes(model))  # the unpruned size bounds the output
        width = {}
        if is_width(args.unit):  # prune() takes the options' fields as keywords
            width = asdict(width_options(args))
            del width["unit"], width["ratio"]
        if args.unit == "experts":
            width = dict(allocation=args.allocation)
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
            **depth_extras(args),
            **criterion_options(args),
        )
        return _report(result)
