"""The criterion interface: a small class that scores units (higher = more important)."""

from __future__ import annotations

import inspect
import math
from abc import ABC
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from tqdm.auto import tqdm

from secateurs.adapters import Adapter
from secateurs.errors import ConfigError
from secateurs.plan import Unit
from secateurs.units.width import ParamSlice, group_slices, output_projection

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PreTrainedModel


@dataclass
class ScoringContext:
    """Everything a criterion may use: the session's model (real, or a meta skeleton whose
    layers the flow loads one at a time), the calibration ``flow`` (None: data-free), and the
    depth units already ``removed`` from the base model (iterative pruning; staged plans)."""

    session: Any  # a ``session.base.Session``: where the weights live
    flow: Any = None  # a ``session.flow.Flow`` over the calibration windows; None: data-free
    removed: tuple[Unit, ...] = ()
    progress: bool = True
    extras: dict[str, Any] = field(default_factory=dict)  # criteria may leave details here

    @property
    def model(self) -> PreTrainedModel:
        return self.session.model

    @property
    def adapter(self) -> Adapter:
        return self.session.adapter

    @property
    def calibration(self) -> torch.Tensor | None:
        return None if self.flow is None else self.flow.tokens

    def batches(self) -> Iterator[torch.Tensor]:
        """The calibration batches on the model's device (criteria that run the whole model:
        a backward pass needs it in memory)."""
        if self.flow is None:
            raise ConfigError("This criterion needs calibration data.")
        for batch in self.flow.batches:
            yield batch.to(self.session.device)

    def num_layers(self) -> int:
        return self.adapter.num_layers(self.model)

    def bar(self, iterable: Any, desc: str, total: int | None = None) -> Any:
        return tqdm(iterable, desc=desc, total=total, disable=not self.progress, leave=False)

    # --- width units: what a width criterion needs, without module names ----------------------
    def groups(self, layer: int, kind: str) -> list[ParamSlice]:
        """Each ``kind`` group's weight/bias slices in ``layer`` (see ``ParamSlice.per_group``)."""
        return group_slices(self.model, self.adapter, layer, kind)

    def output_projection(self, layer: int, kind: str) -> tuple[torch.nn.Module, torch.Tensor]:
        """(o_proj / down_proj of ``layer``, its input columns per group (groups, members))."""
        return output_projection(self.model, self.adapter, layer, kind)


class Criterion(ABC):
    """Scores units. Subclasses declare what they can score (``units``) and what they need.

    Depth units ("block", "attn", "mlp") are scored by ``score``: one value per layer. Width
    units ("heads": KV head groups, "channels": MLP channels) by ``score_width``: per layer, one
    value per group. A width criterion needs no module names: ``ctx.groups(layer, kind)`` gives
    every group's weight slices (``ParamSlice.per_group(values)`` regroups any tensor shaped like
    the weight, e.g. a gradient, to (groups, members, rest)), and ``capture_inputs`` /
    ``input_statistics`` give the inputs X of each layer's output projection (o_proj /
    down_proj), whose columns ``ctx.output_projection(layer, kind)[1]`` map to groups.
    """

    name: ClassVar[str]
    units: ClassVar[frozenset[str]] = frozenset({"block", "attn", "mlp"})
    needs_calibration: ClassVar[bool] = True
    uses_backward: ClassVar[bool] = False
    # reads weights only through matmuls and widening copies, so a lazy session may hold its
    # Linear weights in their stored 16-bit dtype (half the memory, the same scores)
    reads_stored_weights: ClassVar[bool] = False
    # width scores are predicted calibration-loss changes, comparable across layers and kinds
    # as they are: global allocation ranks them per parameter and needs no sensitivity probe
    loss_scores: ClassVar[bool] = False
    # width scores predict the model *after* reconstruction re-fits what remains: without it the
    # ranking describes a model that is not produced
    assumes_reconstruction: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        if options:
            raise ConfigError(f"Criterion {self.name!r} takes no options {sorted(options)}.")

    @classmethod
    def accepts(cls) -> tuple[str, ...]:
        """The keyword options the constructor takes (declared in the registry's table)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name != "self" and p.kind != p.VAR_KEYWORD)

    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        """One importance score per layer for depth unit kind ``unit`` (shape ``(num_layers,)``)."""
        raise ConfigError(f"Criterion {self.name!r} cannot score {unit!r} units.")

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        """Per layer, one importance per ``kind`` group (shape ``(groups,)``; higher = keep)."""
        raise ConfigError(f"Criterion {self.name!r} cannot score {kind!r} units.")

    def options(self) -> dict[str, Any]:
        """The options this instance was built with (recorded in results)."""
        return {}

    def streams(self, num_layers: int) -> int:
        """Modified activation streams the flow holds at once while this criterion scores."""
        return 0


class Observer:
    """What a layer-wise criterion watches in one layer while calibration data runs through it.

    ``attached()`` registers hooks on that layer's modules (and removes them after); the
    observer accumulates what it needs. The base class watches nothing (data-free criteria).
    """

    @contextmanager
    def attached(self) -> Iterator[None]:
        yield


class ProjectionInputs(Observer):
    """``InputStats`` of one layer's output projection (o_proj / down_proj) inputs."""

    def __init__(self, ctx: ScoringContext, layer: int, kind: str) -> None:
        self.module, self.columns = ctx.output_projection(layer, kind)
        self.stats: InputStats | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.stats is None:
            self.stats = InputStats(torch.zeros_like(x[0]), torch.zeros_like(x[0]))
        self.stats.total += x.sum(0)
        self.stats.squares += (x * x).sum(0)
        self.stats.tokens += x.shape[0]

    @contextmanager
    def attached(self) -> Iterator[None]:
        handle = self.module.register_forward_pre_hook(lambda module, args: self.add(args[0]))
        try:
            yield
        finally:
            handle.remove()


class Layerwise(Criterion):
    """A criterion computed layer by layer from what each layer shows (and its weights).

    Subclasses implement ``observer`` (what to watch in layer i) and ``layer_score`` (tensor
    math on the observer and layer i's weights, which exist while it is called). The flow runs
    the calibration windows through one layer at a time, in memory or from disk alike.
    """

    def observer(self, ctx: ScoringContext, kind: str, layer: int) -> Observer:
        return Observer()

    def layer_score(
        self, ctx: ScoringContext, kind: str, layer: int, observed: Observer
    ) -> torch.Tensor:
        raise NotImplementedError

    def score(self, ctx: ScoringContext, unit: str) -> torch.Tensor:
        if unit not in self.units:
            return super().score(ctx, unit)
        scores = layer_scores(self, ctx, unit)
        return torch.tensor([float(s) if s.numel() else math.inf for s in scores])

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        if kind not in self.units:
            return super().score_width(ctx, kind)
        return [s.cpu() for s in layer_scores(self, ctx, kind)]


@torch.no_grad()
def layer_scores(criterion: Layerwise, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
    """Each layer's ``layer_score`` (an empty tensor for a block the base model removes)."""
    scores = [torch.empty(0, dtype=torch.float64)] * ctx.num_layers()
    if not criterion.needs_calibration:
        for index in ctx.bar(range(ctx.num_layers()), f"{criterion.name}: layers"):
            with ctx.session.loaded(index):
                scores[index] = criterion.layer_score(ctx, kind, index, Observer())
        return scores
    if ctx.flow is None:
        raise ConfigError(f"Criterion {criterion.name!r} needs calibration data.")
    ctx.flow.set_base(ctx.removed)
    for step in ctx.flow.walk(desc=f"{criterion.name}: layers"):
        observer = criterion.observer(ctx, kind, step.index)
        with observer.attached():
            step.advance()
        scores[step.index] = criterion.layer_score(ctx, kind, step.index, observer)
    return scores


def calibration_loss(model: PreTrainedModel, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch of equal-length windows."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


AGGREGATIONS = ("sum", "mean", "max", "prod")


def aggregate(parts: list[torch.Tensor], how: str = "sum") -> torch.Tensor:
    """Combine per-slice group scores (each (groups,)) into one score per group."""
    stacked = torch.stack([p.to(torch.float64) for p in parts])
    if how == "sum":
        return stacked.sum(0)
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    raise ConfigError(f"Unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}.")


@dataclass
class InputStats:
    """Per-column sums of an output projection's inputs over calibration tokens (float64)."""

    total: torch.Tensor
    squares: torch.Tensor
    tokens: int = 0

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """Population variance per column (FLAP's fluctuation)."""
        return (self.squares / self.tokens - self.mean**2).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens (Wanda)."""
        return self.squares.sqrt()


def input_statistics(ctx: ScoringContext, kind: str) -> list[InputStats | None]:
    """``InputStats`` of every layer's output projection inputs, in one pass of the flow."""
    observed: list[InputStats | None] = [None] * ctx.num_layers()
    ctx.flow.set_base(ctx.removed)
    for step in ctx.flow.walk(desc=f"{kind}: input statistics"):
        inputs = ProjectionInputs(ctx, step.index, kind)
        with inputs.attached():
            step.advance()
        observed[step.index] = inputs.stats
    return observed


def columns_per_group(values: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Sum a per-column vector over each group's columns: (in,) → (groups,)."""
    return values[columns.to(values.device)].sum(-1)


ROWS_AT_ONCE = 1024  # weight rows in float64 at a time: a 14B down_proj whole would be 0.57 GB


def column_sums(weight: torch.Tensor, power: int = 1) -> torch.Tensor:
    """Σ_i |W_ij|^power per column j of ``weight`` (out, in), in float64, a block of rows at a
    time: the whole float64 copy (and its |·|) would dwarf the layer-by-layer memory budget."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], ROWS_AT_ONCE):
        block = weight[start : start + ROWS_AT_ONCE].detach().to(torch.float64)
        block = block.abs_() if power == 1 else block.pow_(power).abs_()
        total += block.sum(0)
    return total
