"""A subcommand: a small class that declares its flags and runs over the Python API."""

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
