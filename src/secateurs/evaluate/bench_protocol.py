"""The generation benchmark's protocol, apart from the benchmark: ``secateurs bench`` reads its
defaults to build its flags without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from secateurs.errors import ConfigError


@dataclass(frozen=True)
class BenchConfig:
    """The measurement protocol, recorded with every result."""

    batch_sizes: tuple[int, ...] = (1, 4, 16)
    new_tokens: int = 128
    prompt_len: int = 16
    repeats: int = 3
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError(f"Batch sizes must be positive; got {self.batch_sizes}.")
        if self.new_tokens < 1 or self.prompt_len < 1 or self.repeats < 1 or self.warmup < 0:
            raise ConfigError("new_tokens, prompt_len and repeats must be ≥ 1, warmup ≥ 0.")
