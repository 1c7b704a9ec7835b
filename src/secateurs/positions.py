"""How long a sequence a model accepts, read from its config (or config.json, without torch).

Two kinds of limit: a learned position table (GPT-2, OPT) ends at its last row, and a longer
sequence fails inside the embedding (IndexError); rotary (RoPE) and ALiBi models run past
``max_position_embeddings``, but on positions they were not trained for.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from secateurs.errors import ConfigError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
# Config keys of rotary-position models: no table to run out of, only trained lengths.
ROTARY_KEYS = (
    "rope_parameters",
    "rope_theta",
    "rope_scaling",
    "rotary_dim",
    "rotary_pct",
    "rotary_emb_base",
    "partial_rotary_factor",
)


def _namespace(config: Any) -> Any:
    return SimpleNamespace(**config) if isinstance(config, dict) else config


def max_positions(config: Any) -> int | None:
    """The longest sequence the config allows; None where it sets no limit (ALiBi)."""
    limit = _limit(config)
    return limit[0] if limit else None


def _limit(config: Any) -> tuple[int, str] | None:
    """(positions, the config key that says so), or None."""
    config = _namespace(config)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value, key
    return None


def learned_positions(config: Any) -> bool:
    """True where positions come from a learned table (no rotary or ALiBi setting)."""
    config = _namespace(config)
    if getattr(config, "alibi", False):
        return False
    return all(getattr(config, key, None) is None for key in ROTARY_KEYS)


def check_seq_len(seq_len: int, config: Any, name: str = "the model") -> None:
    """Refuse windows longer than the model's positions (an IndexError or a hang otherwise)."""
    limit = _limit(config)
    if limit is None or seq_len <= limit[0]:
        return
    raise ConfigError(
        f"--seq-len {seq_len} is longer than {name} supports ({limit[0]} positions, "
        f"config.{limit[1]}); use --seq-len {limit[0]} or less."
    )


def check_length(tokens: int, config: Any, name: str, what: str) -> str | None:
    """``what`` (``tokens`` positions, e.g. a prompt and its generated tokens) against the
    model's positions: refused beyond a learned table; beyond a RoPE / ALiBi model's trained
    length, the warning to give (it runs there); None where it fits."""
    limit = _limit(config)
    if limit is None or tokens <= limit[0]:
        return None
    positions, key = limit
    if learned_positions(config):
        raise ConfigError(
            f"{what} = {tokens} tokens, longer than {name} supports ({positions} positions, "
            f"config.{key}): its learned position embeddings end there. Use {positions} tokens "
            "or fewer."
        )
    return (
        f"{what} = {tokens} tokens, beyond the {positions} positions {name} was trained for "
        f"(config.{key}): it runs there (rotary positions), but on positions it never saw."
    )


def check_generation(prompt_len: int, new_tokens: int, config: Any, name: str) -> str | None:
    """``check_length`` for a prompt and the tokens generated after it."""
    what = f"prompt_len {prompt_len} + new_tokens {new_tokens}"
    return check_length(prompt_len + new_tokens, config, name, what)
