"""How calibration data flows through a model while a criterion observes it.

A criterion that can be computed one layer at a time (``criteria.base.Layerwise``) says what it
wants to see of layer i (``observer``: hooks on that layer's modules) and how to turn that and
the layer's weights into scores (``layer_score``: tensor math). A pipeline decides how the data
flows and when the weights exist:

- ``WholeModelPipeline``: the model is in memory; every observer is attached at once and the
  calibration batches run through the whole model; then each layer is scored.
- ``SequentialPipeline``: the model is a ``LazyModel``; the calibration tokens are embedded
  once and every layer's call arguments recorded (masks, rotary tables: they do not depend on
  the hidden states), then layer by layer: read the layer from disk, run the cached hidden
  states through it with its observer attached, score it, keep its outputs as the next layer's
  inputs, drop its weights. Memory: one layer plus the calibration activations.

Both run the same criterion code, so their scores agree to float rounding (tested for every
adapter). ``SequentialPipeline.removal_nll`` is the layer-at-a-time form of "the calibration
loss with unit i removed" (``ppl``): every candidate's stream advances in lockstep while each
layer is loaded once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.errors import ConfigError
from secateurs.layerwise import Stop, _output_like
from secateurs.reconstruct import LayerCalls, run_layer
from secateurs.units import Unit, first_arg, masked

if TYPE_CHECKING:
    from secateurs.criteria.base import Layerwise, ScoringContext
    from secateurs.lazy import LazyModel


class WholeModelPipeline:
    """Observe every layer during whole-model forwards of the calibration batches."""

    name = "whole-model"

    @torch.no_grad()
    def layer_scores(
        self, criterion: Layerwise, ctx: ScoringContext, kind: str
    ) -> list[torch.Tensor]:
        count = ctx.num_layers()
        observers = [criterion.observer(ctx, kind, i) for i in range(count)]
        if criterion.needs_calibration:
            with ExitStack() as stack, masked(ctx.model, ctx.adapter, ctx.removed):
                for observer in observers:
                    stack.enter_context(observer.attached())
                for batch in ctx.bar(ctx.batches(), f"{criterion.name}: calibration"):
                    ctx.model(input_ids=batch, use_cache=False)
        return [criterion.layer_score(ctx, kind, i, observers[i]) for i in range(count)]


class SequentialPipeline:
    """Score a ``LazyModel`` one layer at a time on cached calibration activations."""

    name = "sequential"

    def __init__(
        self,
        lazy: LazyModel,
        calibration: torch.Tensor,
        batch_size: int = 8,
        progress: bool = True,
        offload: str | os.PathLike | None = None,
    ) -> None:
        self.lazy, self.progress = lazy, progress
        self.offload = Path(offload) if offload is not None else None
        step = max(1, batch_size)
        self.batches = [calibration[i : i + step] for i in range(0, len(calibration), step)]
        self.calls = capture_calls(lazy, self.batches)

    def bar(self, iterable: Any, desc: str) -> Any:
        return tqdm(iterable, desc=desc, disable=not self.progress, leave=False)

    @torch.no_grad()
    def layer_scores(
        self, criterion: Layerwise, ctx: ScoringContext, kind: str
    ) -> list[torch.Tensor]:
        if ctx.removed:
            raise ConfigError("Sequential scoring starts from the unpruned model (no --iterative).")
        hidden, scores = list(self.calls.hidden), []
        for index in self.bar(range(len(self.lazy.layers)), f"{criterion.name}: layers"):
            with self.lazy.loaded(index) as layer:
                observer = criterion.observer(ctx, kind, index)
                if criterion.needs_calibration:
                    with observer.attached():
                        hidden = self.run(layer, index, hidden)
                scores.append(criterion.layer_score(ctx, kind, index, observer))
        return scores

    def run(
        self, layer: nn.Module, index: int, hidden: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``layer`` (loaded) on each batch's cached input, with its recorded arguments."""
        calls = self.calls.calls[index]
        return [run_layer(layer, h, call) for h, call in zip(hidden, calls, strict=True)]

    # --- "loss with unit i removed", every candidate at once -----------------------------------
    @torch.no_grad()
    def removal_nll(self, unit: str, candidates: Sequence[int]) -> dict[int, float]:
        """Mean calibration NLL with each candidate layer's ``unit`` removed alone.

        Candidate c's stream equals the unpruned stream up to layer c; from there it runs its
        own copy of the activations (layer c skipped, or run with its branch masked). All
        streams pass through a layer while it is loaded, so each layer is read once.
        """
        base = list(self.calls.hidden)
        streams = Streams(self.offload)
        wanted = set(candidates)
        try:
            for index in self.bar(range(len(self.lazy.layers)), f"ppl: {unit} streams"):
                with self.lazy.loaded(index) as layer:
                    for c in streams:
                        streams[c] = self.run(layer, index, streams[c])
                    if index in wanted:
                        streams[index] = self._removed_at(layer, index, unit, base)
                    last = index + 1 == len(self.lazy.layers)
                    base = [] if last else self.run(layer, index, base)
            return {c: self.mean_nll(streams[c]) for c in streams}
        finally:
            streams.clear()

    def _removed_at(self, layer, index: int, unit: str, base: list) -> list[torch.Tensor]:
        if unit == "block":
            return [h.clone() for h in base]  # the stream skips the layer: its input as is
        with masked(self.lazy.model, self.lazy.adapter, [Unit(index, unit)]):
            return self.run(layer, index, base)

    def mean_nll(self, final: Sequence[torch.Tensor]) -> float:
        """Mean next-token NLL of the calibration windows from the last layer's outputs."""
        total, count = 0.0, 0
        for batch, hidden in zip(self.batches, final, strict=True):
            nll, n = self.lazy.head_nll(self.final_states(batch, hidden), batch)
            total, count = total + nll, count + n
        return total / count

    @property
    def decoder(self) -> nn.Module:
        """The module that owns the layers (its forward adds the final norm / projection)."""
        return self.lazy.model.get_submodule(self.lazy.adapter.layers_path.rpartition(".")[0])

    def final_states(self, batch: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's output (final norm, projections) for last-layer outputs ``hidden``,
        by the model's own forward with every layer a pass-through injecting ``hidden``."""
        layers = self.lazy.layers
        last = len(layers) - 1
        with (
            _passthroughs(layers, self.calls.template, inject_at=last, state=hidden),
            self.lazy.embedded(batch) as ids,
        ):
            out = self.decoder(input_ids=ids.to(self.lazy.device), use_cache=False)
        return out[0]  # last_hidden_state (a plain or MoE output class)


class Streams:
    """Candidate activation streams by layer: in memory, or each in a file of ``directory``
    (one stream per candidate layer adds up to L × the calibration activations: at 70B with
    10 windows of 128 tokens, 80 × 42 MB). Read and written whole, one stream at a time."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[int, list[torch.Tensor]] = {}
        self._files: dict[int, Path] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._memory, *self._files}))

    def __getitem__(self, candidate: int) -> list[torch.Tensor]:
        if self.directory is None:
            return self._memory[candidate]
        return torch.load(self._files[candidate], weights_only=True)

    def __setitem__(self, candidate: int, hidden: list[torch.Tensor]) -> None:
        if self.directory is None:
            self._memory[candidate] = hidden
            return
        path = self.directory / f"stream-{candidate}.pt"
        torch.save([h.contiguous() for h in hidden], path)
        self._files[candidate] = path

    def clear(self) -> None:
        self._memory.clear()
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()


@contextmanager
def _passthroughs(
    layers: nn.ModuleList, template: Any, inject_at: int | None = None, state: Any = None
) -> Iterator[None]:
    """Every layer returns its input unchanged (layer ``inject_at`` returns ``state``)."""

    def make(index: int) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden = state if index == inject_at else first_arg(args, kwargs)
            return _output_like(template, hidden)

        return forward

    try:
        for index, layer in enumerate(layers):
            layer.forward = make(index)
        yield
    finally:
        for layer in layers:
            with contextlib.suppress(AttributeError):
                del layer.forward


@torch.no_grad()
def layer_output_template(lazy: LazyModel, batch: torch.Tensor) -> Any:
    """What a decoder layer returns (a tensor, or a tuple whose tail we must reproduce)."""
    seen: dict[str, Any] = {}

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        seen["output"] = output
        raise Stop

    with lazy.loaded(0) as first, lazy.embedded(batch[:1, :2]) as ids:
        handle = first.register_forward_hook(keep)
        try:
            with contextlib.suppress(Stop):
                lazy.model(input_ids=ids.to(lazy.device), use_cache=False)
        finally:
            handle.remove()
    return seen["output"]


@torch.no_grad()
def capture_calls(lazy: LazyModel, batches: Sequence[torch.Tensor]) -> LayerCalls:
    """Embed each batch and record every layer's call arguments, with no layer loaded."""
    layers = lazy.layers
    template = layer_output_template(lazy, batches[0])
    cache = LayerCalls([], [[] for _ in layers])

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                cache.hidden.append(h.detach())
            cache.calls[index].append((rest, kwargs))
            if index == len(layers) - 1:
                raise Stop

        return hook

    handles = [
        m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(layers)
    ]
    try:
        with _passthroughs(layers, template):
            for batch in batches:
                with lazy.embedded(batch) as ids, contextlib.suppress(Stop):
                    lazy.model(input_ids=ids.to(lazy.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    cache.template = template
    return cache
