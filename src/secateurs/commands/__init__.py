"""CLI subcommands, one small class per file, registered by their path (e.g. ("eval", "ppl"))."""

from __future__ import annotations

import argparse
from typing import ClassVar


class Command:
    """A subcommand: declares its flags and runs over the Python API."""

    path: ClassVar[tuple[str, ...]]
    help: ClassVar[str]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags."""

    def run(self, args: argparse.Namespace) -> int | None:
        raise NotImplementedError


COMMANDS: dict[tuple[str, ...], Command] = {}


def register(cls: type[Command]) -> type[Command]:
    if cls.path in COMMANDS:
        raise ValueError(f"command {' '.join(cls.path)!r} is already registered")
    COMMANDS[cls.path] = cls()
    return cls


# Explicit imports: each module registers its command(s).
from secateurs.commands import (  # noqa: E402,F401
    bench,
    eval_generate,
    eval_ppl,
    eval_zeroshot,
    export,
    ls,
    prune,
    recover,
    report,
    score,
)
