"""The ``secateurs`` command: one entry point; each subcommand is a small class in ``commands/``.

Options may come from a YAML recipe (``--config recipe.yaml``); flags given on the command line
override the recipe. Only the chosen subcommand's flags are built (its ``add_arguments`` may
import what its defaults need), and command modules import heavy libraries (torch,
transformers, lm-eval, peft, matplotlib, datasets) only when they run, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from secateurs.commands import COMMANDS, Command
from secateurs.errors import ConfigError, SecateursError

log = logging.getLogger("secateurs.cli")

DESCRIPTION = (
    "Structured pruning of Hugging Face causal LMs: remove blocks, attention/MLP branches, "
    "KV head groups or MLP channels by a chosen criterion, then recover, evaluate and report."
)
EPILOG = (
    "First run: 'secateurs ls' lists criteria, architectures and datasets; "
    "'secateurs prune smollm2-135m --remove 6 --out runs/d6' prunes the embedded SmolLM2-135M. "
    "'secateurs COMMAND --help' for a command's options."
)


THREADS_HELP = (
    "torch CPU threads. Default: OMP_NUM_THREADS if set, else the cores idle when the command "
    "starts (at least 1): on a shared machine, a thread waiting for a busy core made a forward "
    "pass 2-5x slower than one thread"
)
SAMPLE_S = 0.1  # how long the CPUs' idle time is watched to choose the default
SPARE = 0.2  # a core counts as idle from 80% idle: oversubscribing costs more than one core less


def choose_threads(requested: int | None) -> int | None:
    """Threads for torch: ``requested``, else None when OMP_NUM_THREADS already says (torch
    reads it), else the cores idle now, at least 1."""
    if requested is not None:
        if requested < 1:
            raise ConfigError(f"--threads must be at least 1; got {requested}.")
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return max(1, min(cores, math.floor(idle_cores() + SPARE)))


def idle_cores() -> float:
    """Cores idle over the next ``SAMPLE_S`` seconds (/proc/stat); elsewhere, the cores minus
    the 1-minute load average. Not the load average on Linux: it still counts, for a minute,
    the work of the command that ran just before (e.g. the previous quickstart step)."""
    first = cpu_times()
    if first is None:
        cores = os.cpu_count() or 1
        return cores - (os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0)
    time.sleep(SAMPLE_S)
    second = cpu_times()
    idle, total = (b - a for a, b in zip(first, second, strict=True))
    return (os.cpu_count() or 1) * idle / total if total > 0 else float(os.cpu_count() or 1)


def cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat; None where there is none."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle + iowait; user … steal


def apply_threads(threads: int | None) -> None:
    """Before torch is imported, through the environment (torch, MKL and OpenMP read it at
    start); torch already imported (tests, the Python API): set it directly."""
    if threads is None:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    log.debug("torch CPU threads: %d", threads)


def build_parser(
    selected: tuple[str, ...] | None = None,
) -> tuple[argparse.ArgumentParser, dict[tuple[str, ...], argparse.ArgumentParser]]:
    """The parser; only ``selected``'s flags are added (all of them when ``selected`` is None)."""
    parser = argparse.ArgumentParser(prog="secateurs", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, dest="threads_first", metavar="N", help=THREADS_HELP)
    groups = {(): parser.add_subparsers(dest="command", required=True, metavar="COMMAND")}
    leaves: dict[tuple[str, ...], argparse.ArgumentParser] = {}
    for path, command in sorted(COMMANDS.items()):
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                names = sorted(p[depth] for p in COMMANDS if len(p) > depth and p[:depth] == prefix)
                group = groups[prefix[:-1]].add_parser(
                    prefix[-1], help=f"{prefix[-1]}: {', '.join(names)}"
                )
                groups[prefix] = group.add_subparsers(
                    dest=f"sub{depth}", required=True, metavar="WHAT"
                )
        leaf = groups[path[:-1]].add_parser(path[-1], help=command.help, description=command.help)
        leaf.add_argument("--config", type=Path, help="YAML recipe; command-line flags override it")
        if selected is None or path == selected:
            command.add_arguments(leaf)
            if "--threads" not in leaf._option_string_actions:  # bench has its own
                leaf.add_argument("--threads", type=int, metavar="N", help=THREADS_HELP)
        leaf.set_defaults(_command=command, _path=path)
        leaves[path] = leaf
    return parser, leaves


def apply_recipe(parser: argparse.ArgumentParser, recipe: Path) -> None:
    """Use the recipe's keys as defaults of ``parser`` (flags on the command line still win)."""
    import yaml

    if not recipe.is_file():
        raise ConfigError(f"Recipe {recipe} does not exist.")
    try:
        values = yaml.safe_load(recipe.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"Recipe {recipe} is not UTF-8 text (byte {err.start}).") from err
    except yaml.YAMLError as err:  # the parser's own words say where, e.g. "line 2, column 7"
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"Recipe {recipe} is not valid YAML{at}: {problem}.") from err
    if not isinstance(values, dict):
        raise ConfigError(f"Recipe {recipe} must be a mapping of option: value.")
    known = {action.dest for action in parser._actions}
    normalised = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(normalised) - known)
    if unknown:
        raise ConfigError(
            f"Recipe {recipe}: unknown options {unknown}; known: {sorted(known - {'help'})}."
        )
    parser.set_defaults(**normalised)
    for action in parser._actions:  # a recipe may supply required positionals / options
        if action.dest in normalised:
            action.required = False
            if action.nargs is None and not action.option_strings:
                action.nargs = "?"


def recipe_target(argv: list[str]) -> tuple[tuple[str, ...] | None, Path | None]:
    """The subcommand path and ``--config`` file named in ``argv`` (before full parsing)."""
    recipe = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            recipe = Path(argv[i + 1])
        elif arg.startswith("--config="):
            recipe = Path(arg.split("=", 1)[1])
    # the command's words, without the values of options given before it (--threads N)
    words = tuple(
        a for i, a in enumerate(argv) if not a.startswith("-") and argv[i - 1 : i] != ["--threads"]
    )
    path = next((p for p in sorted(COMMANDS, key=len, reverse=True) if words[: len(p)] == p), None)
    return path, recipe


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path, recipe = recipe_target(argv)
        parser, leaves = build_parser(path or ())
        if recipe is not None and path is not None:
            apply_recipe(leaves[path], recipe)  # must precede parsing: it may supply required args
        args = parser.parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        threads = getattr(args, "threads", None)
        apply_threads(choose_threads(args.threads_first if threads is None else threads))
        command: Command = args._command
        return command.run(args) or 0
    except SecateursError as err:
        print(f"secateurs: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "secateurs: interrupted (outputs are left as they were, or complete)", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
