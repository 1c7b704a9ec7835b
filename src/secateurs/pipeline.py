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
adapter).

Criteria that measure the loss of modified models (``ppl``: a unit removed; ``mini-llm``: gates
perturbed) describe each model as a ``Perturbation``: equal to the base model up to layer
``start``, with some layers' calls modified from there (``edits``). ``perturbed_losses`` gives
each one's per-window calibration losses. The whole-model pipeline runs them one after the
other from cached layer inputs (``LayerRunner``); the sequential one advances every
perturbation's activation stream in lockstep with the base stream, so each layer is loaded
once for all of them (``removal_nll`` is its ``ppl`` case).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.errors import ConfigError
from secateurs.layerwise import LayerRunner, Stop, _output_like
from secateurs.reconstruct import LayerCalls, run_layer
from secateurs.units import Unit, first_arg, masked

if TYPE_CHECKING:
    from secateurs.criteria.base import Layerwise, ScoringContext
    from secateurs.lazy import LazyModel


# --- modified models, as data -------------------------------------------------------------------
class Edit(Protocol):
    """How one layer's call differs in a perturbed model: ``applied`` installs the change
    (hooks) while the layer runs; ``skip``: the layer is bypassed (its output is its input)."""

    skip: bool

    def applied(
        self, model: PreTrainedModel, adapter: Adapter, layer: int
    ) -> AbstractContextManager: ...


@dataclass(frozen=True)
class Removal:
    """The ``kind`` unit of the layer removed (a block is skipped, a branch masked)."""

    kind: str

    @property
    def skip(self) -> bool:
        return self.kind == "block"

    def applied(
        self, model: PreTrainedModel, adapter: Adapter, layer: int
    ) -> AbstractContextManager:
        return masked(model, adapter, [Unit(layer, self.kind)])


@dataclass(frozen=True)
class Perturbation:
    """A model equal to the base one up to layer ``start``; ``edits[i]`` modifies layer i ≥
    ``start`` (layers without an edit run as they are). No edits: the base model itself."""

    start: int
    edits: Mapping[int, Edit] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(layer < self.start for layer in self.edits):
            raise ValueError(f"edits before the start layer {self.start}: {sorted(self.edits)}")


def window_losses(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Mean next-token NLL of each window (B,), float64 — the per-window ``calibration_loss``.

    Computed in float64 (as ``LazyModel.token_nll``: both pipelines give the same losses to
    the logits' rounding, which finite differences divide by a small step), ``chunk`` positions
    at a time, so no second logits-sized tensor is held next to the logits.
    """
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    steps = ids.shape[1] - 1
    for start in range(0, steps, chunk):
        part = logits[:, start : min(start + chunk, steps)].to(torch.float64)
        target = ids[:, start + 1 : start + 1 + part.shape[1]]
        total += F.cross_entropy(part.transpose(1, 2), target, reduction="none").sum(-1)
    return total / steps


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

    @torch.no_grad()
    def perturbed_losses(
        self, ctx: ScoringContext, perturbations: Sequence[Perturbation]
    ) -> list[torch.Tensor]:
        """Per-window losses (windows,) of each perturbed model (``ctx.removed`` gone too),
        one after the other, each running only layers ``start..`` from cached inputs."""
        runner = LayerRunner(ctx.model, ctx.adapter, ctx.calibration, ctx.batch_size)
        last = max((p.start for p in perturbations), default=0)
        if last > 0:
            runner.capture(ctx.removed, stop=last + 1)
        return [self._losses(ctx, runner, p) for p in ctx.bar(perturbations, "perturbed models")]

    @staticmethod
    def _losses(ctx: ScoringContext, runner: LayerRunner, p: Perturbation) -> torch.Tensor:
        with ExitStack() as stack:
            for layer, edit in p.edits.items():
                stack.enter_context(edit.applied(ctx.model, ctx.adapter, layer))
            parts = [window_losses(lg, ids) for ids, lg in runner.logits_from(p.start, ctx.removed)]
        return torch.cat(parts).cpu()


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

    # --- perturbed models, every stream at once ---------------------------------------------
    @torch.no_grad()
    def perturbed_losses(
        self, ctx: ScoringContext | None, perturbations: Sequence[Perturbation]
    ) -> list[torch.Tensor]:
        """Per-window losses (windows,) of each perturbed model, all streams in lockstep."""
        if ctx is not None and ctx.removed:
            raise ConfigError("Sequential scoring starts from the unpruned model (no --iterative).")
        return self.perturbed(perturbations, self.window_losses)

    def perturbed(
        self, perturbations: Sequence[Perturbation], reduce: Callable[[list[torch.Tensor]], Any]
    ) -> list[Any]:
        """``reduce`` of each perturbed model's last-layer outputs.

        Perturbation p's stream equals the base stream up to layer ``p.start``; from there it
        runs its own copy of the activations through the layers, modified by its edits. All
        streams pass through a layer while it is loaded, so each layer is read once; streams
        live in ``Streams`` (files under ``offload`` when set). A perturbation without edits
        is the base stream itself.
        """
        count = len(self.lazy.layers)
        own = [i for i, p in enumerate(perturbations) if p.edits]
        keep_base = len(own) < len(perturbations)
        base, streams = list(self.calls.hidden), Streams(self.offload)
        try:
            for index in self.bar(range(count), f"{len(own)} perturbed streams"):
                with self.lazy.loaded(index) as layer:
                    for i in streams:
                        streams[i] = self._step(perturbations[i], layer, index, streams[i])
                    for i in own:
                        if perturbations[i].start == index:
                            streams[i] = self._step(perturbations[i], layer, index, base)
                    last = index + 1 == count
                    base = [] if last and not keep_base else self.run(layer, index, base)
            return [reduce(streams[i] if p.edits else base) for i, p in enumerate(perturbations)]
        finally:
            streams.clear()

    def _step(self, p: Perturbation, layer: nn.Module, index: int, hidden: list) -> list:
        """Stream ``hidden`` through loaded ``layer`` as perturbation ``p`` has it."""
        edit = p.edits.get(index)
        if edit is None:
            return self.run(layer, index, hidden)
        if edit.skip:
            return [h.clone() for h in hidden]  # the stream skips the layer: its input as is
        with edit.applied(self.lazy.model, self.lazy.adapter, index):
            return self.run(layer, index, hidden)

    @torch.no_grad()
    def removal_nll(self, unit: str, candidates: Sequence[int]) -> dict[int, float]:
        """Mean calibration NLL with each candidate layer's ``unit`` removed alone (``ppl``)."""
        candidates = sorted(set(candidates))
        removals = [Perturbation(c, {c: Removal(unit)}) for c in candidates]
        return dict(zip(candidates, self.perturbed(removals, self.mean_nll), strict=True))

    def window_losses(self, final: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL of each calibration window (windows,) float64."""
        parts = [
            self.lazy.token_nll(self.final_states(batch, hidden), batch).mean(-1)
            for batch, hidden in zip(self.batches, final, strict=True)
        ]
        return torch.cat(parts).cpu()

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
    """Perturbed activation streams by perturbation: in memory, or each in a file of
    ``directory`` (``ppl``'s one stream per candidate layer adds up to L × the calibration
    activations: at 70B with 10 windows of 128 tokens, 80 × 42 MB). Read and written whole,
    one stream at a time."""

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
