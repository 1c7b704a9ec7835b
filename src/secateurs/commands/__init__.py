"""CLI subcommands, one small class per file, registered by their path (e.g. ("eval", "ppl"))."""

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
from secateurs.commands.base import COMMANDS, Command, register

__all__ = ["COMMANDS", "Command", "register"]
