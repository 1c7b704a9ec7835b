"""Modified models, as data: a ``Perturbation`` is the base model with some layers' calls
changed from a start layer on (``Edit``s), so that the flow can run many of them from cached
inputs, or layer by layer from disk in lockstep. Criteria, searches and probes describe the
models they need here; how they run is the flow's business (``session.flow``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from secateurs.plan import Unit
from secateurs.units.depth import masked
from secateurs.units.width import width_masked


class Edit(Protocol):
    """How one layer's call differs in a modified model: ``applied`` installs the change (hooks)
    while the layer runs; ``skip``: the layer is bypassed (its output is its input)."""

    skip: bool

    def applied(self, session: Any, layer: int) -> AbstractContextManager: ...


@dataclass(frozen=True)
class Removal:
    """The ``kind`` depth unit of the layer removed (a block is skipped, a branch masked)."""

    kind: str

    @property
    def skip(self) -> bool:
        return self.kind == "block"

    def applied(self, session: Any, layer: int) -> AbstractContextManager:
        return masked(session.model, session.adapter, [Unit(layer, self.kind)])


@dataclass(frozen=True)
class WidthMask:
    """An edit of one layer: its ``units`` of ``kind`` masked (a ``flow.Edit``)."""

    kind: str
    units: tuple[int, ...]
    skip = False

    def applied(self, session: Any, layer: int) -> AbstractContextManager:
        removed = [self.units if i == layer else () for i in range(session.num_layers)]
        return width_masked(session.model, session.adapter, {self.kind: removed})


@dataclass(frozen=True)
class Perturbation:
    """A model equal to the base one up to layer ``start``; ``edits[i]`` modifies layer i ≥
    ``start`` (layers without an edit run as in the base). No edits: the base model itself."""

    start: int
    edits: Mapping[int, Edit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(layer < self.start for layer in self.edits):
            raise ValueError(f"edits before the start layer {self.start}: {sorted(self.edits)}")
