"""The criterion interface: a small class that scores units (higher = more important)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.errors import ConfigError
from secateurs.units import Unit


@dataclass
class ScoringContext:
    """Everything a criterion may use. ``removed`` units are masked (iterative pruning)."""

    model: PreTrainedModel
    adapter: Adapter
    calibration: torch.Tensor | None  # (N, T) token ids
    batch_size: int = 1
    removed: tuple[Unit, ...] = ()
    progress: bool = True
    extras: dict[str, Any] = field(default_factory=dict)  # criteria may leave details here

    def batches(self) -> Iterator[torch.Tensor]:
        if self.calibration is None:
            raise ConfigError("This criterion needs calibration data.")
        device = next(self.model.parameters()).device
        for start in range(0, len(self.calibration), self.batch_size):
            yield self.calibration[start : start + self.batch_size].to(device)

    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def bar(self, iterable: Any, desc: str, total: int | None = None) -> Any:
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)


class Criterion(ABC):
    """Scores depth units. Subclasses declare what they can score and what they need."""

    name: ClassVar[str]
    units: ClassVar[frozenset[str]] = frozenset({"block", "attn", "mlp"})
    needs_calibration: ClassVar[bool] = True
    uses_backward: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"Criterion {self.name!r} takes no options {sorted(options)}.")

    @abstractmethod
    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        """One importance score per layer for unit kind ``unit`` (shape ``(num_layers,)``)."""

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (recorded in results)."""
        return {}


def calibration_loss(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of equal-length windows."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss
