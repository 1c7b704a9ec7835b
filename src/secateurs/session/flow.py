"""THE engine that runs calibration windows through a session's decoder layers.

The windows are embedded once and every layer's call arguments recorded (attention masks,
rotary tables, cache positions: none depends on the hidden states), with every layer a
pass-through, so nothing is computed. From then on the hidden states move one layer at a time:
``walk()`` yields each layer loaded, with its input, for an observer or a fit to look at before
the stream advances through it; ``perturbed()`` advances the streams of modified models in
lockstep with the base stream, so each layer is loaded once for all of them; ``inputs(i)``
caches the base stream's input of layer i for searches that score many candidates.

Every criterion, search, sensitivity probe, reconstruction and healing uses this engine, in
memory and layer by layer from disk alike; only ``Session.loaded`` differs. Depth units removed
from the base model (``base``) are skipped (blocks) or masked (branches) as the stream passes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from secateurs.edits import Edit, Perturbation, Removal
from secateurs.plan import Unit
from secateurs.session.base import Session, Stop, passthroughs
from secateurs.units.depth import first_arg

Call = tuple[tuple, dict]  # a layer's positional arguments after the hidden states, and kwargs


@dataclass
class Step:
    """Layer ``index`` loaded, with the base stream's input ``hidden`` (one tensor per batch).
    ``advance()`` runs the layer (as the caller may have changed it) and moves the stream on;
    a walk advances by itself where the caller did not."""

    flow: Flow
    index: int
    layer: nn.Module
    hidden: list[torch.Tensor]
    output: list[torch.Tensor] | None = None

    def advance(self) -> list[torch.Tensor]:
        self.output = self.flow.run(self.index, self.hidden)
        return self.output

    def run_until(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        """Call ``fn(x)`` with ``module``'s input for every batch, running the layer only as
        far as ``module`` (its output is not needed)."""
        self.flow.run_until(self.index, self.hidden, module, fn)


class Flow:
    """Calibration windows ``tokens`` (N, T) through ``session``'s layers (module docstring)."""

    def __init__(
        self,
        session: Session,
        tokens: torch.Tensor,
        batch_size: int = 8,
        progress: bool = False,
        offload: str | os.PathLike | None = None,
    ) -> None:
        self.session, self.progress = session, progress
        step = max(1, int(batch_size))
        self.tokens = tokens
        self.batches = [tokens[i : i + step] for i in range(0, len(tokens), step)]
        self.offload = None if offload is None else Path(offload)
        _, first, self.calls = capture_calls(session, self.batches)
        self.base: tuple[Unit, ...] = ()
        self._inputs: dict[int, list[torch.Tensor]] = {0: first}
        self.keep_inputs = False

    # --- running one layer ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.session.num_layers

    def bar(self, iterable: Any, desc: str) -> Any:
        return tqdm(iterable, desc=desc, disable=not self.progress, leave=False)

    def run(self, index: int, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index`` (loaded, as the base model has it) on each batch's ``hidden``."""
        edit = self.base_edit(index)
        if edit is not None and edit.skip:
            return list(hidden)
        with _applied(edit, self.session, index):
            return self.run_unedited(index, hidden)

    def run_unedited(self, index: int, hidden: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Layer ``index`` (loaded) as it is now, whatever the base model removes, on the
        first ``len(hidden)`` batches."""
        layer, calls = self.session.layers[index], self.calls[index][: len(hidden)]
        with torch.no_grad():
            return [_call(layer, h, call) for h, call in zip(hidden, calls, strict=True)]

    def run_until(
        self, index: int, hidden: Sequence[torch.Tensor], module: nn.Module, fn: Callable
    ) -> None:
        """Feed ``module``'s inputs to ``fn`` on every batch, stopping the layer there."""

        def hook(mod: nn.Module, args: tuple) -> None:
            fn(args[0])
            seen.append(True)
            raise Stop

        seen: list[bool] = []
        handle = module.register_forward_pre_hook(hook)
        try:
            with torch.no_grad(), _applied(self.base_edit(index), self.session, index):
                layer = self.session.layers[index]
                for h, call in zip(hidden, self.calls[index], strict=True):
                    with contextlib.suppress(Stop):
                        _call(layer, h, call)
        finally:
            handle.remove()
        if not seen:
            raise RuntimeError(f"Layer {index}: {type(module).__name__} never ran on the windows.")

    # --- the base stream -----------------------------------------------------------------------
    def base_edit(self, index: int) -> Edit | None:
        kinds = {u.kind for u in self.base if u.layer == index}
        if not kinds:
            return None
        return Removal("block" if "block" in kinds or kinds >= {"attn", "mlp"} else kinds.pop())

    def set_base(self, removed: Sequence[Unit]) -> None:
        """Remove depth units from the base model; cached inputs after the first change go."""
        changed = set(removed) ^ set(self.base)
        self.base = tuple(removed)
        if changed:
            first = min(u.layer for u in changed)
            self._inputs = {i: h for i, h in self._inputs.items() if i <= first}

    def walk(self, start: int = 0, stop: int | None = None, desc: str = "layers") -> Iterator[Step]:
        """Each layer of ``start..stop`` loaded, with the base stream's input (``Step``);
        blocks the base model removes are passed over (not loaded, not yielded)."""
        stop = self.num_layers if stop is None else stop
        hidden = self.inputs(start)
        for index in self.bar(range(start, stop), desc):
            edit = self.base_edit(index)
            if edit is None or not edit.skip:
                with self.session.loaded(index) as layer:
                    step = Step(self, index, layer, hidden)
                    yield step
                    hidden = step.output if step.output is not None else step.advance()
            if self.keep_inputs and index + 1 < self.num_layers:
                self._inputs[index + 1] = hidden

    def inputs(self, index: int) -> list[torch.Tensor]:
        """The base stream's input of layer ``index`` (computed from the nearest cached one)."""
        if index in self._inputs:
            return self._inputs[index]
        start = max(i for i in self._inputs if i < index)
        keep, self.keep_inputs = self.keep_inputs, True
        try:
            for _ in self.walk(start, index, desc="layer inputs"):
                pass
        finally:
            self.keep_inputs = keep
        return self._inputs[index]

    # --- modified models -----------------------------------------------------------------------
    def perturbed(
        self, perturbations: Sequence[Perturbation], reduce: Callable[[list[torch.Tensor]], Any]
    ) -> list[Any]:
        """``reduce`` of each modified model's last-layer outputs. Each stream forks from the
        base stream at its ``start`` and passes through the following layers with its edits,
        while that layer is loaded for all of them (every layer read once)."""
        if not perturbations:
            return []
        first = min(p.start for p in perturbations)
        streams = Streams(self.offload)
        waiting = [i for i, p in enumerate(perturbations) if p.edits]
        base = self.inputs(first)
        try:
            for step in self.walk(first, desc=f"{len(waiting)} modified models"):
                for i in streams:
                    streams[i] = self._step(perturbations[i], step.index, streams[i])
                # a stream starting at a layer the base skips starts at the next one it runs
                for i in [i for i in waiting if perturbations[i].start <= step.index]:
                    streams[i] = self._step(perturbations[i], step.index, step.hidden)
                    waiting.remove(i)
                base = step.advance()
            started = set(streams)
            return [reduce(streams[i] if i in started else base) for i in range(len(perturbations))]
        finally:
            streams.clear()

    def _step(self, p: Perturbation, index: int, hidden: list[torch.Tensor]) -> list:
        edit = p.edits.get(index)
        if edit is None:
            return self.run(index, hidden)
        if edit.skip:
            return [h.clone() for h in hidden]
        with edit.applied(self.session, index):
            return self.run(index, hidden)

    def losses(self, perturbations: Sequence[Perturbation]) -> list[torch.Tensor]:
        """Per-window mean next-token NLL (windows,) of each modified model."""
        return self.perturbed(perturbations, self.window_losses)

    # --- reading out the last layer's outputs --------------------------------------------------
    def window_losses(self, final: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean next-token NLL of each window (windows,), float64."""
        parts = [
            self.session.token_nll(ids, hidden).mean(-1)
            for ids, hidden in zip(self.batches, final, strict=True)
        ]
        return torch.cat(parts).cpu()

    def mean_nll(self, final: Sequence[torch.Tensor]) -> float:
        """Mean next-token NLL over every predicted token of the windows."""
        total, count = 0.0, 0
        for ids, hidden in zip(self.batches, final, strict=True):
            nll = self.session.token_nll(ids, hidden)
            total, count = total + float(nll.sum()), count + nll.numel()
        return total / count

    def logits(self, final: Sequence[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(window ids, logits) one window at a time, for objectives that read whole
        distributions. A batch's logits and their log-softmax would be the largest tensors of
        a search (8 windows × 128 tokens × 49,152 words in float32: 0.2 GB each at SmolLM2's
        size); one window's are a batch's share. ``final`` may cover the first batches only."""
        for ids, hidden in zip(self.batches[: len(final)], final, strict=True):
            for row in range(len(ids)):
                window = slice(row, row + 1)
                yield ids[window], self.session.logits(ids[window], hidden[window])

    def final(self) -> list[torch.Tensor]:
        """The base model's last-layer outputs (from cached inputs where there are some)."""
        return self.perturbed([Perturbation(self.num_layers - 1)], lambda final: final)[0]


@contextmanager
def _applied(edit: Edit | None, session: Session, index: int) -> Iterator[None]:
    if edit is None or edit.skip:
        yield
        return
    with edit.applied(session, index):
        yield


def _call(layer: nn.Module, hidden: torch.Tensor, call: Call) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Streams:
    """Modified activation streams, in memory or each in a file of ``directory`` (``ppl``'s one
    stream per candidate layer adds up to L × the calibration activations: at 70B with 10
    windows of 128 tokens, 80 × 42 MB)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._memory: dict[int, list[torch.Tensor]] = {}
        self._files: dict[int, Path] = {}
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._memory, *self._files}))

    def __getitem__(self, key: int) -> list[torch.Tensor]:
        if self.directory is None:
            return self._memory[key]
        return torch.load(self._files[key], weights_only=True)

    def __setitem__(self, key: int, hidden: list[torch.Tensor]) -> None:
        if self.directory is None:
            self._memory[key] = hidden
            return
        path = self.directory / f"stream-{key}.pt"
        torch.save([h.contiguous() for h in hidden], path)
        self._files[key] = path

    def clear(self) -> None:
        self._memory.clear()
        for path in self._files.values():
            path.unlink(missing_ok=True)
        self._files.clear()


@torch.no_grad()
def capture_calls(
    session: Session, batches: Sequence[torch.Tensor]
) -> tuple[Any, list[torch.Tensor], list[list[Call]]]:
    """(a layer's output template, each batch's input of layer 0, every layer's call
    arguments per batch): one forward per batch with every layer a pass-through."""
    layers = session.layers
    template = session.template
    if template is None:
        template = layer_output_template(session, batches[0])
    session.template = template
    first: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in layers]

    def record(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                first.append(h.detach())
            calls[index].append((rest, kwargs))
            if index == len(layers) - 1:
                raise Stop

        return hook

    with ExitStack() as stack:
        for i, module in enumerate(layers):
            handle = module.register_forward_pre_hook(record(i), with_kwargs=True)
            stack.callback(handle.remove)
        stack.enter_context(passthroughs(layers, template))
        for batch in batches:
            with session.embedded(batch) as ids, contextlib.suppress(Stop):
                session.model(input_ids=ids, use_cache=False)
    return template, first, calls


@torch.no_grad()
def layer_output_template(session: Session, batch: torch.Tensor) -> Any:
    """What a decoder layer returns (a tensor, or a tuple whose tail a pass-through repeats),
    from layer 0 on two tokens."""
    seen: dict[str, Any] = {}

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        seen["output"] = output
        raise Stop

    with session.loaded(0) as first, session.embedded(batch[:1, :2]) as ids:
        handle = first.register_forward_hook(keep)
        try:
            with contextlib.suppress(Stop):
                session.model(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
    return seen["output"]


__all__ = ["Edit", "Flow", "Perturbation", "Removal", "Step", "Streams", "first_arg"]
