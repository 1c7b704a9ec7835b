"""The flags of ``secateurs prune`` (and ``score``), and the ``PruneSpec`` they make.

A flag's default is None ("not given"): ``PruneSpec.from_options`` then uses the spec's own
default and can refuse a flag that does not apply to the chosen units, instead of ignoring it.
The help states each effective default.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from secateurs.defaults import (
    DEFAULT_SHORTLIST,
    DEPTH_SHARE,
    HEAL_DAMPING,
    HEAL_OBJECTIVES,
    HEAL_SAMPLES,
    HEAL_TARGETS,
    JUDGE_SAMPLES,
    LATENCY_ENGINE,
    RECONSTRUCT_DAMPING,
    RECONSTRUCT_SAMPLES,
    SEARCH_GENERATIONS,
)
from secateurs.errors import ConfigError

UNIT_HELP = (
    "what to remove. Depth: block (whole decoder layers), attn / mlp (one branch of a layer), "
    "subblock (attention and MLP branches chosen together by a greedy PPL search). Width: heads "
    "(KV head groups), channels (MLP channels), width (both). block,width: blocks and width "
    "under one --ratio budget. auto: how many head groups and MLP channels each layer keeps "
    "(0 removes the branch; both 0, the block), chosen for all layers together by an "
    "evolutionary search under --ratio, --params or --latency. "
    "experts: routed experts of MoE models. Default: block"
)
# Flags whose store_true value False means "not given".
SWITCHES = ("iterative", "heal", "heal_bias", "uniform_widths", "include_embeddings",
            "sequential", "stream", "in_memory")  # fmt: skip


def add_unit_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--unit", default=None, help=UNIT_HELP)
    parser.add_argument(
        "--criterion",
        default=None,
        help="how units are scored (secateurs ls lists them): ppl, taylor, magnitude, "
        "block-influence, activation, fluctuation, influence, hywia, mini-llm, reap, ...; "
        "NAME+ protects Shortened LLaMA's layers (see --protect); BLOCK,WIDTH for block,width. "
        "Default: ppl+",
    )
    parser.add_argument(
        "--protect",
        default=None,
        help="layers never removed: 'sl' = Shortened LLaMA's set (the first four and the last "
        "two: 0,1,2,3,L-2,L-1), 'none', or indices like '0,1,-1' (negatives count from the end). "
        "Default: 'sl' for NAME+ criteria, 'none' otherwise",
    )
    parser.add_argument(
        "--option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="a criterion option, repeatable (e.g. --option p=2, --option objective=nll); "
        "unknown ones are refused with the criterion's list",
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="calibration windows per forward (8)"
    )


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument(
        "--ratio",
        type=float,
        help="fraction of the decoder's parameters to remove (all but the embeddings and the "
        "head, unless --include-embeddings), for every unit kind",
    )
    amount.add_argument(
        "--remove",
        type=int,
        help="a count: depth units, experts per MoE layer, or (--unit subblock) that many "
        "blocks' parameters",
    )
    amount.add_argument("--params", type=int, help="parameters to remove")
    amount.add_argument(
        "--latency",
        type=float,
        metavar="F",
        help="--unit auto: keep F (0 < F < 1) of the dense model's decode time per token on "
        "--engine, as its per-layer latency table predicts (measured once per machine, cached)",
    )
    parser.add_argument(
        "--engine",
        default=None,
        help="the engine whose latency --latency budgets: llama.cpp (f16 GGUF, 1 thread, this "
        f"CPU; the only one yet). Default: {LATENCY_ENGINE}",
    )
    parser.add_argument(
        "--include-embeddings", action="store_true", help="--ratio counts embeddings too"
    )


def add_selection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--iterative",
        action="store_true",
        help="depth: re-score after each removal; with ppl a greedy search that re-scores "
        "only the --shortlist most promising candidates per step",
    )
    parser.add_argument(
        "--shortlist",
        type=_shortlist,
        default=None,
        help="greedy ppl search: candidates re-scored per step after the first full step "
        f"('all' = exact greedy, 0 = the first step's ranking). Default: {DEFAULT_SHORTLIST}",
    )
    parser.add_argument("--scores", type=Path, help="reuse depth scores saved by 'secateurs score'")
    search = parser.add_argument_group("joint search (--unit auto)")
    search.add_argument(
        "--generations",
        type=_positive_int,
        default=None,
        help=f"generations of the evolutionary search (default {SEARCH_GENERATIONS})",
    )
    search.add_argument(
        "--judge-samples",
        type=_positive_int,
        default=None,
        help="calibration windows that judge each candidate, apart from those that repair "
        f"it (default {JUDGE_SAMPLES})",
    )
    group = parser.add_argument_group("explicit selection (no scoring)")
    group.add_argument("--blocks", help="remove these blocks, e.g. 12,13,14,16,17,18")
    group.add_argument("--attn", help="remove these layers' attention branches")
    group.add_argument("--mlp", help="remove these layers' MLP branches")
    group.add_argument(
        "--plan", type=Path, help="a plan JSON, or another run's secateurs.json (any kind)"
    )


def add_fit_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("repair of what remains (closed form, no training)")
    _add_heal_args(group)
    _add_width_fit_args(group)


def _add_heal_args(group: Any) -> None:  # an argparse argument group
    group.add_argument(
        "--heal",
        action="store_true",
        help="depth: fit a least-squares correction of each removed run of blocks into the "
        "MLP output projection before it (ReplaceMe's estimator)",
    )
    group.add_argument(
        "--heal-samples", type=int, default=None, help=f"windows for --heal ({HEAL_SAMPLES})"
    )
    group.add_argument(
        "--heal-bias", action="store_true", help="--heal also fits that projection's bias"
    )
    group.add_argument(
        "--heal-damping",
        type=_damping,
        default=None,
        help="ridge penalty of the --heal fit, as a fraction of its inputs' mean energy, or "
        f"'auto': chosen per run on held-out windows ({HEAL_DAMPING})",
    )
    group.add_argument(
        "--heal-target",
        default=None,
        choices=HEAL_TARGETS,
        help="what --heal reproduces: local = what the removed blocks added to the stream "
        "(default); dense = the dense model's stream after them (also corrects earlier drift)",
    )
    group.add_argument(
        "--heal-objective",
        default=None,
        choices=HEAL_OBJECTIVES,
        help="what --heal minimises: lsq = the squared error of the stream, in closed form "
        "(default); cosine = ReplaceMe's cosine distance, refined from the lsq solution",
    )


def _add_width_fit_args(group: Any) -> None:
    group.add_argument(
        "--reconstruct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="width: re-fit the kept columns of each output projection by least squares on "
        "calibration activations (default: on)",
    )
    group.add_argument(
        "--reconstruct-damping",
        type=float,
        default=None,
        help="how strongly that fit is pulled towards the plainly sliced weights: a ridge "
        f"penalty as a fraction of the inputs' mean energy ({RECONSTRUCT_DAMPING})",
    )
    group.add_argument(
        "--reconstruct-samples",
        type=int,
        default=None,
        help=f"windows for the reconstruction fit, at least ({RECONSTRUCT_SAMPLES})",
    )
    group.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="width without reconstruction: fold removed units' mean output into the bias "
        "(FLAP); default: the criterion's (on for fluctuation)",
    )


def add_allocation_args(parser: argparse.ArgumentParser) -> None:
    from secateurs.targets import TARGETS

    group = parser.add_argument_group("where width and experts go")
    group.add_argument(
        "--allocation",
        default=None,
        choices=("uniform", "global"),
        help="uniform: the same share in every layer (default); global: rank every layer's "
        "units together",
    )
    group.add_argument("--layers", default=None, help="layers width may touch, START:STOP")
    group.add_argument("--min-ratio", type=float, default=None, help="least share per layer (0)")
    group.add_argument("--max-ratio", type=float, default=None, help="most share per layer (0.9)")
    group.add_argument("--round-to", type=int, default=None, help="keep channels a multiple of N")
    group.add_argument(
        "--uniform-widths",
        action="store_true",
        help="global scores, one width for every layer (a plain config)",
    )
    group.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="global allocation sized by measured per-layer loss sensitivity (default: on, "
        "except for criteria scoring predicted loss changes, e.g. influence)",
    )
    group.add_argument(
        "--target",
        choices=TARGETS.names(),
        help="keep the pruned shapes servable by this engine (docs/export.md)",
    )
    group.add_argument(
        "--depth-share",
        type=float,
        default=None,
        help=f"--unit block,width: the budget's share taken by whole blocks ({DEPTH_SHARE})",
    )
    group.add_argument("--min-keep", type=int, default=None, help="experts kept per layer, least")


def add_mode_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models larger than memory")
    group.add_argument(
        "--sequential",
        action="store_true",
        help="read the checkpoint one layer at a time (memory: one layer + the calibration "
        "activations; taken by itself when the model would not fit)",
    )
    group.add_argument(
        "--stream",
        action="store_true",
        help="with --blocks/--plan: copy the kept tensors without computing anything",
    )
    group.add_argument(
        "--in-memory",
        action="store_true",
        help="load the model whole, even when it looks too large for the memory available",
    )
    group.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="read layer by layer when loading whole would need more (default: 80%% of the "
        "memory available)",
    )
    group.add_argument(
        "--offload-dir",
        type=Path,
        default=None,
        help="layer by layer: keep ppl / mini-llm's modified activation streams in files here",
    )


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument(
        "--calibration", default=None, help="'c4' (default) or a .txt/.jsonl/.json.gz file"
    )
    group.add_argument("--n-samples", type=int, default=None, help="scoring windows (10)")
    group.add_argument("--calib-seq-len", type=int, default=None, help="tokens per window (128)")
    group.add_argument("--seed", type=int, default=None, help="sampling seed (0)")


def _damping(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', not {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def _shortlist(text: str) -> int | str:
    if text.strip().lower() == "all":
        return "all"
    try:
        value = int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(
            f"--shortlist takes a count or 'all', not {text!r}"
        ) from err
    if value < 0:
        raise argparse.ArgumentTypeError(f"--shortlist must be >= 0; got {value}")
    return value


SPEC_FLAGS = (
    "unit", "criterion", "protect", "batch_size", "ratio", "remove", "params",
    "include_embeddings", "iterative", "shortlist", "scores", "blocks", "attn", "mlp", "plan",
    "heal", "heal_samples", "heal_bias", "heal_target", "heal_damping", "heal_objective",
    "reconstruct",
    "reconstruct_damping", "reconstruct_samples", "compensate", "allocation", "layers",
    "min_ratio", "max_ratio", "round_to", "uniform_widths", "sensitivity", "target",
    "depth_share", "min_keep", "generations", "judge_samples", "latency", "engine",
    "sequential", "stream", "in_memory", "max_memory", "offload_dir", "calibration", "n_samples",
    "calib_seq_len", "seed", "dtype", "device", "data_dir",
)  # fmt: skip


def spec_from_args(args: argparse.Namespace, **fixed: Any):
    """The ``PruneSpec`` of parsed flags (a recipe's keys arrive the same way)."""
    from secateurs.spec import PruneSpec

    options = {k: getattr(args, k) for k in SPEC_FLAGS if hasattr(args, k)}
    for switch in SWITCHES:
        if options.get(switch) is False:
            options[switch] = None
    options["options"] = parse_options(getattr(args, "option", None))
    for key in ("scores", "plan", "offload_dir"):
        if options.get(key) is not None:
            options[key] = str(options[key])
    return PruneSpec.from_options(**{**options, **fixed})


def parse_options(items: Any) -> dict[str, Any] | None:
    """``--option KEY=VALUE`` (repeatable; a recipe may give a mapping) → {key: value}."""
    import yaml

    if not items:
        return None
    options: dict[str, Any] = {}
    for item in items if isinstance(items, list) else [items]:
        if isinstance(item, dict):
            options.update(item)
            continue
        key, sep, value = str(item).partition("=")
        if not sep:
            raise ConfigError(f"--option takes KEY=VALUE, not {item!r}.")
        try:
            options[key.strip().replace("-", "_")] = yaml.safe_load(value)
        except yaml.YAMLError as err:  # e.g. an unclosed '[': say which option, not a trace
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(
                f"--option {item}: the value is not a number, word or YAML list ({problem})."
            ) from err
    return options
