"""Scores of one unit kind by one criterion, with what reproduces them; saved by ``secateurs
score`` and reused by ``prune --scores`` (one-shot depth selections at any budget)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from secateurs.checkpoint import write_json


@dataclass(frozen=True)
class ScoreResult:
    """Per-layer scores of ``unit`` units by ``criterion`` (higher = more important)."""

    criterion: str
    unit: str
    values: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    removed_before: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["values"] = list(self.values)
        data["removed_before"] = [list(u) for u in self.removed_before]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreResult:
        names = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in names}  # drop run metadata
        data["values"] = tuple(data["values"])
        data["removed_before"] = tuple(tuple(u) for u in data.get("removed_before", ()))
        return cls(**data)


def save_scores(scores: ScoreResult, path: str | os.PathLike, extra: dict | None = None) -> None:
    from secateurs.runinfo import versions

    write_json(Path(path), {**scores.to_dict(), **(extra or {}), "versions": versions()})
