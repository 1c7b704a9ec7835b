"""How long a sequence a model accepts, read from its config (or config.json, without torch)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from secateurs.errors import ConfigError

POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(config: Any) -> int | None:
    """The longest sequence the config allows; None where it sets no limit (ALiBi)."""
    if isinstance(config, dict):
        config = SimpleNamespace(**config)
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(seq_len: int, config: Any, name: str = "the model") -> None:
    """Refuse windows longer than the model's positions (an IndexError or a hang otherwise)."""
    limit = max_positions(config)
    if limit is None or seq_len <= limit:
        return
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    key = next(k for k in POSITION_KEYS if get(k) == limit)
    raise ConfigError(
        f"--seq-len {seq_len} is longer than {name} supports ({limit} positions, config.{key}); "
        f"use --seq-len {limit} or less."
    )
