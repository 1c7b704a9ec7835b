"""Where the weights live during a run: the ``Session`` interface both sessions implement.

A session holds a model (real weights, or a ``meta`` skeleton whose layers are read from disk
one at a time) and answers the few questions the flow, the criteria and the cut ask of it:
give me layer i with real weights (``loaded``), feed these token ids to the embedding
(``embedded``), turn the last layer's outputs into logits or next-token NLL (``logits``,
``token_nll``), and remember that layer i was changed (``changed``) so the writer takes it from
memory instead of the source checkpoint. Nothing else may differ between the sessions: the
flow, the criteria, the cut and the fits run the same code in both, so every mode gives the same
model (``tests/test_modes.py``).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.units.depth import first_arg

log = logging.getLogger(__name__)


class Stop(Exception):
    """Raised by a hook to end a forward pass once everything needed was seen."""


class Session:
    """A model and where its weights are; see the module docstring. Subclasses: resident
    (``session.resident``) and lazy (``session.lazy``)."""

    kind: str = "memory"

    def __init__(self, model: PreTrainedModel, adapter: Adapter, tokenizer: Any, source: Any):
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.source = None if source is None else str(source)
        self.modified: set[int] = set()  # layers changed by the cut or a fit (original indices)
        self.notes: dict[str, Any] = {}  # what the record should say of the session
        self.template: Any = None  # what a decoder layer returns (``flow.capture_calls``)
        self.work: Any = None  # a folder for temporary files (beside the output)
        self.temporary: list[Any] = []  # temporary folders, removed by ``close``

    # --- the model ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` with real weights for the duration of the block."""
        yield self.layers[index]

    def changed(self, index: int) -> None:
        """Layer ``index`` (original numbering) was cut or re-fitted while loaded."""
        self.modified.add(index)

    @contextmanager
    def embedded(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """The ids to feed the model for windows ``ids`` (the lazy session renumbers them)."""
        yield ids.to(self.device)

    # --- the head ------------------------------------------------------------------------------
    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of windows ``ids`` whose last decoder layer output ``hidden``."""
        raise NotImplementedError

    def token_nll(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token NLL (B, T − 1), float64, from the last decoder layer's outputs."""
        raise NotImplementedError

    def final_states(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output (final norm and what else the family applies) for last-layer
        outputs ``hidden``: the model's own forward with every layer a pass-through."""
        decoder = self.model.get_submodule(self.adapter.layers_path.rpartition(".")[0])
        with passthroughs(self.layers, self.template, lambda: hidden), self.embedded(ids) as fed:
            return decoder(input_ids=fed, use_cache=False)[0]

    # --- life cycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release what the session holds (temporary files)."""
        for folder in self.temporary:
            shutil.rmtree(folder, ignore_errors=True)

    def freed_while_writing(self) -> int:
        """Bytes of disk the write frees as it goes (a lazy session's spilled layers)."""
        return 0

    def record(self) -> dict[str, Any]:
        """How the weights were held, for ``secateurs.json``."""
        return {"name": self.kind, **self.notes}


def output_like(template: Any, hidden: torch.Tensor) -> Any:
    """``hidden`` shaped as a layer's output: a tensor, or a tuple with the template's tail."""
    return (hidden, *template[1:]) if isinstance(template, tuple) else hidden


@contextmanager
def passthroughs(
    layers: nn.ModuleList, template: Any, inject: Callable[[], torch.Tensor] | None = None
) -> Iterator[None]:
    """Every layer returns its input unchanged; the last returns ``inject()`` if given. The
    model's own forward then does the rest (masks, rotary tables, final norm, head)."""
    last = len(layers) - 1

    def make(index: int) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = inject() if inject is not None and index == last else first_arg(args, kwargs)
            return output_like(template, hidden)

        return forward

    own = [layer.__dict__.get("forward") for layer in layers]  # a forward set on the instance
    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer, forward in zip(layers, own, strict=True):
            with contextlib.suppress(AttributeError):
                del layer.forward  # the instance attribute; the class's forward returns
            if forward is not None:
                layer.forward = forward
