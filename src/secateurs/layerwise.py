"""Run a model's decoder layers from cached hidden states: the layer-wise data flow.

Depth search scores a candidate by running only the layers after it. ``LayerRunner`` caches the
input of every decoder layer on the calibration windows (with the units already removed), then
runs layers ``start..L-1`` from layer ``start``'s cached input. The model's own ``forward`` does
the rest — position embeddings, attention masks (per-layer sliding windows included), rotary
tables, the final norm, soft-capping and the head — with the layers before ``start`` replaced by
weightless pass-throughs, so every family is handled exactly as its whole-model forward does,
at the cost of an embedding lookup. Nothing a layer receives besides its hidden state depends on
the hidden states, which is what makes the cached inputs valid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.units import Unit, first_arg, masked


class Stop(Exception):
    """Raised by a hook to end a forward pass once everything needed was captured."""


def _output_like(template: Any, hidden: torch.Tensor) -> Any:
    """``hidden`` shaped as a layer's output: a tensor, or a tuple with the same tail."""
    return (hidden, *template[1:]) if isinstance(template, tuple) else hidden


def _passthrough(template: Any, inject: Callable[[], torch.Tensor] | None) -> Callable:
    """A layer forward that computes nothing: returns its input, or the injected state."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        hidden = inject() if inject is not None else first_arg(args, kwargs)
        return _output_like(template, hidden)

    return forward


class LayerRunner:
    """Cached layer inputs of ``input_ids`` windows and runs from any layer on.

    ``capture(removed)`` fills ``inputs[i]`` (N, T, hidden) for every layer i with ``removed``
    units gone; ``logits_from(start, removed)`` yields (window ids, logits) per batch, running
    layers ``start..`` from ``inputs[start]``. Units of ``removed`` before ``start`` are taken to
    be already reflected in the cache (it must have been captured with them removed).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: Adapter,
        input_ids: torch.Tensor,
        batch_size: int = 8,
    ) -> None:
        self.model, self.adapter = model, adapter
        self.layers = adapter.layers(model)
        self.device = next(model.parameters()).device
        self.input_ids = input_ids
        self.batch_size = max(1, batch_size)
        self.inputs: list[torch.Tensor | None] = [None] * len(self.layers)
        self.templates = self._output_templates()
        self._current: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.layers)

    def batches(self) -> Iterator[tuple[slice, torch.Tensor]]:
        for begin in range(0, len(self.input_ids), self.batch_size):
            rows = slice(begin, begin + self.batch_size)
            yield rows, self.input_ids[rows].to(self.device)

    @torch.no_grad()
    def _output_templates(self) -> list[Any]:
        """Each layer's output structure (tensor or tuple tail), from one two-token forward."""
        templates: list[Any] = [None] * len(self.layers)

        def keep(index: int):
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                templates[index] = output

            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(self.layers)]
        try:
            self.model(input_ids=self.input_ids[:1, :2].to(self.device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return templates

    @contextmanager
    def _from_layer(self, start: int, removed: Iterable[Unit]) -> Iterator[None]:
        """Layers before ``start`` bypassed (layer start-1 emits the injected state); removed
        blocks at or after ``start`` bypassed, removed branches there masked."""
        removed = [u for u in removed if u.layer >= start]
        skip = {u.layer for u in removed if u.kind == "block"}
        bypassed = []
        with ExitStack() as stack:
            try:
                for index, layer in enumerate(self.layers):
                    if index < start or index in skip:
                        inject = self._injected if index == start - 1 else None
                        layer.forward = _passthrough(self.templates[index], inject)
                        bypassed.append(layer)
                branches = [u for u in removed if u.kind != "block"]
                stack.enter_context(masked(self.model, self.adapter, branches))
                yield
            finally:
                for layer in bypassed:
                    del layer.forward  # the instance attribute; the class method returns

    def _injected(self) -> torch.Tensor:
        assert self._current is not None
        return self._current

    @torch.no_grad()
    def logits_from(
        self, start: int, removed: Iterable[Unit] = ()
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(window ids, logits) per batch, running layers ``start..`` from the cache."""
        if start > 0 and self.inputs[start] is None:
            raise RuntimeError(f"Layer {start}'s inputs are not cached; capture first.")
        with self._from_layer(start, tuple(removed)):
            for rows, ids in self.batches():
                self._current = self.inputs[start][rows] if start > 0 else None
                yield ids, self.model(input_ids=ids, use_cache=False).logits
        self._current = None

    @torch.no_grad()
    def capture(
        self, removed: Iterable[Unit] = (), start: int = 0, stop: int | None = None
    ) -> None:
        """Cache the inputs of layers ``start..stop-1`` (default: to the last) with ``removed``
        units gone; the forward ends at layer stop-1 (the head is never run)."""
        removed = tuple(removed)
        wanted = range(start, len(self.layers) if stop is None else stop)
        parts: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}

        def keep(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                parts[index].append(first_arg(args, kwargs).detach())
                if index == wanted[-1]:
                    raise Stop

            return hook

        handles = [
            self.layers[i].register_forward_pre_hook(keep(i), with_kwargs=True) for i in wanted
        ]
        try:
            with self._from_layer(start, removed):
                for rows, ids in self.batches():
                    self._current = self.inputs[start][rows] if start > 0 else None
                    with suppress(Stop):
                        self.model(input_ids=ids, use_cache=False)
        finally:
            self._current = None
            for handle in handles:
                handle.remove()
        for index in wanted:  # pop: the pieces go as their copy is made (peak memory)
            self.inputs[index] = torch.cat(parts.pop(index))
