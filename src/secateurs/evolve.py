"""The joint search (``--unit auto``): every layer's form chosen together under one budget.

Each layer keeps some of its KV head groups (K … 0: 0 removes the attention) and some eighths
of its MLP channels (8 … 0: 0 removes the MLP); a block goes when both go. Which groups and
channels go inside a layer is a criterion's ranking (``activation`` by default); how many go
in each layer is what the search decides.

1. **A variant library, repaired in closed form.** One pass of the dense model over the *fit*
   windows gathers, per layer, the Gram matrices of the output projections' inputs; every
   level's kept columns are then re-solved by least squares (the reconstruction of
   ``fit.reconstruct``, without intercept) so that the layer reproduces the dense branch's
   output. An MLP removed from a layer that keeps its attention is healed into that layer's
   o_proj (the same fit with the MLP's contribution added to the target). Variants are stored
   as kept columns in bfloat16.
2. **Candidates judged on other windows.** A candidate is assembled by writing each layer's
   variant into the model (removed units: zero columns), then judged by KL(dense ‖ candidate)
   over the dense top-k tokens (``objectives.DenseKL``) on *judge* windows disjoint from the
   fit ones, from cached layer inputs (a candidate runs from its first changed layer on).
3. **Evolution** (EvoPress, arXiv 2410.14649): from the best of a few uniform allocations that
   meet the budget, each generation makes offspring by level-switch mutations (one sublayer
   gives a level, another takes one, the budget met and overshot by at most the tolerance) and keeps the best by
   multi-step selection: all offspring on a few judge windows, the best few on more, the best
   one against the parent on all of them.

The chosen candidate becomes an ordinary ``Plan``; the cut then repairs it exactly (width
re-fit, healing of removed runs on the already-pruned model's activations).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.objectives import DenseKL
from secateurs.plan import Plan
from secateurs.units.width import layer_width, output_projection, output_weight_columns

log = logging.getLogger(__name__)

MLP_STEPS = 8  # an MLP keeps 0/8 … 8/8 of its channels
Gene = tuple[int, int]  # (KV groups kept, eighths of the MLP channels kept)
Genome = tuple[Gene, ...]


@dataclass(frozen=True)
class Space:
    """The choices of every layer and what each costs (parameters removed)."""

    kv: int  # KV groups per layer
    channels: int  # MLP channels per layer
    group_cost: int  # parameters of one KV group (its q, k, v rows and o columns)
    channel_cost: int  # parameters of one MLP channel
    attn_rest: int  # what an attention keeps beyond its groups (norms, biases): goes with it
    mlp_rest: int
    num_layers: int

    def kept_channels(self, eighths: int) -> int:
        return round(self.channels * eighths / MLP_STEPS)

    def removed(self, genome: Genome) -> int:
        """Parameters ``genome`` removes."""
        total = 0
        for kv, eighths in genome:
            total += (self.kv - kv) * self.group_cost + (self.attn_rest if kv == 0 else 0)
            gone = self.channels - self.kept_channels(eighths)
            total += gone * self.channel_cost + (self.mlp_rest if eighths == 0 else 0)
        return total

    def dense(self) -> Genome:
        return ((self.kv, MLP_STEPS),) * self.num_layers

    def parameters(self, amount: float) -> Goal:
        """Remove ``amount`` decoder parameters."""
        return Goal(self.removed, amount, "parameters")


@dataclass(frozen=True)
class Goal:
    """What the search must remove (``amount``), measured by ``removed(genome)`` in ``unit``:
    parameters, or seconds per token an engine's latency table predicts."""

    removed: Callable[[Genome], float]
    amount: float
    unit: str


def space_of(model: Any, adapter: Any) -> Space:
    """The search space of a model whose layers all have the same shape."""
    from secateurs.units import unit_cost

    if adapter.heads is None or adapter.channels is None or adapter.output_norms:
        raise UnsupportedModelError(
            f"--unit auto needs head and channel layouts and branch outputs added straight "
            f"to the residual stream; {adapter.name} has not."
        )
    widths = {layer_width(adapter, layer) for layer in adapter.layers(model)}
    if len(widths) != 1:
        raise UnsupportedModelError("--unit auto needs every layer to have the same shape.")
    (width,) = widths
    group, channel = unit_cost(model, adapter, 0, "heads"), unit_cost(model, adapter, 0, "channels")
    attn, mlp = unit_cost(model, adapter, 0, "attn"), unit_cost(model, adapter, 0, "mlp")
    return Space(
        width.kv_heads, width.channels, group, channel,
        attn - width.kv_heads * group, mlp - width.channels * channel, adapter.num_layers(model),
    )  # fmt: skip


# --- the variant library ------------------------------------------------------------------------
@dataclass
class LayerVariants:
    """One layer's dense output projections and every level's re-fitted kept columns."""

    groups: torch.Tensor  # KV groups, least important first
    channels: torch.Tensor  # MLP channels, least important first
    o_dense: torch.Tensor
    down_dense: torch.Tensor
    o_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    o: dict[int, torch.Tensor] = field(default_factory=dict)  # kv kept → (out, kept cols)
    o_healed: dict[int, torch.Tensor] = field(default_factory=dict)  # … with the MLP absorbed
    down: dict[int, torch.Tensor] = field(default_factory=dict)  # eighths kept → (out, kept)


class Library:
    """Every layer's variants (module docstring, 1), fitted on the dense model's inputs."""

    def __init__(self, space: Space, damping: float = 0.01) -> None:
        self.space, self.damping = space, damping
        self.layers: list[LayerVariants] = []

    def build(self, flow: Any, rankings: dict[str, list[torch.Tensor]]) -> None:
        """One pass of ``flow`` (the dense model over the fit windows; its bar shows it)."""
        session = flow.session
        for step in flow.walk(desc="variant library"):
            heads = output_projection(session.model, session.adapter, step.index, "heads")
            channels = output_projection(session.model, session.adapter, step.index, "channels")
            stats = _Moments()
            with _observed(heads[0], channels[0], session, step.index, stats):
                step.advance()
            order = {k: rankings[k][step.index].argsort() for k in ("heads", "channels")}
            self.layers.append(self._fit(stats, heads, channels, order))

    def _fit(self, stats, heads, channels, order) -> LayerVariants:
        o = output_weight_columns(heads[0], _conv1d(heads[0])).detach().double()
        down = output_weight_columns(channels[0], _conv1d(channels[0])).detach().double()
        variants = LayerVariants(order["heads"], order["channels"], o.float(), down.float(),
                                 _bias(heads[0]), _bias(channels[0]))  # fmt: skip
        for kv in range(1, self.space.kv + 1):
            kept = heads[1][order["heads"][self.space.kv - kv :]].flatten().sort().values
            variants.o[kv] = self._solve(stats.o_gram, o, kept)
            variants.o_healed[kv] = self._solve(stats.o_gram, o, kept, stats.o_cross_mlp)
        for eighths in range(1, MLP_STEPS):
            keep = self.space.kept_channels(eighths)
            kept = order["channels"][self.space.channels - keep :].sort().values
            variants.down[eighths] = self._solve(stats.down_gram, down, kept)
        return variants

    def _solve(self, gram, weight, kept, extra=None) -> torch.Tensor:
        """The kept columns W' minimising ||X_k W'ᵀ − (X Wᵀ + D)||² + λ||W' − W_k||² (D: an
        absorbed branch's output, from ``extra`` = XᵀD); stored as bfloat16."""
        a = gram[kept][:, kept].clone()
        b = gram[kept] @ weight.T
        if extra is not None:
            b = b + extra[kept]
        lam = self.damping * float(a.diagonal().mean().clamp_min(1e-12))
        a.diagonal().add_(lam)
        b += lam * weight[:, kept].T
        solution = torch.linalg.solve(a, b).T  # (out, kept)
        return solution.to(torch.bfloat16)

    # --- writing a candidate into the model -----------------------------------------------------
    def assign(self, model: Any, adapter: Any, layer: int, gene: Gene) -> None:
        """Write ``gene``'s variants into ``layer``'s output projections."""
        variants = self.layers[layer]
        o_module, o_cols = output_projection(model, adapter, layer, "heads")
        down_module, _ = output_projection(model, adapter, layer, "channels")
        kv, eighths = gene
        o = torch.zeros_like(variants.o_dense)
        if kv == self.space.kv and eighths > 0:
            o = variants.o_dense.clone()
        elif kv > 0:
            table = variants.o_healed if eighths == 0 else variants.o
            kept = o_cols[variants.groups[self.space.kv - kv :]].flatten().sort().values
            o[:, kept] = table[kv].float()
        down = torch.zeros_like(variants.down_dense)
        if eighths == MLP_STEPS:
            down = variants.down_dense.clone()
        elif eighths > 0:
            keep = self.space.kept_channels(eighths)
            kept = variants.channels[self.space.channels - keep :].sort().values
            down[:, kept] = variants.down[eighths].float()
        _write(o_module, o, None if kv == 0 else variants.o_bias)
        _write(down_module, down, None if eighths == 0 else variants.down_bias)


def _conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)  # GPT-2's projections store (in, out)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().clone()


def _write(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """A projection's weight, and its bias (zero for a removed branch)."""
    with torch.no_grad():
        module.weight.copy_(weight.T if _conv1d(module) else weight)
        if module.bias is not None:
            module.bias.copy_(bias if bias is not None else torch.zeros_like(module.bias))


@dataclass
class _Moments:
    """XᵀX of o_proj's and down_proj's inputs, and o_proj inputsᵀ · the MLP's output."""

    o_gram: Any = 0
    down_gram: Any = 0
    o_cross_mlp: Any = 0
    _o_input: list = field(default_factory=list)

    def o_input(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.o_gram = self.o_gram + x.T @ x
        self._o_input.append(x)

    def down_input(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        self.down_gram = self.down_gram + x.T @ x

    def mlp_output(self, y: torch.Tensor) -> None:
        y = y.reshape(-1, y.shape[-1]).double()
        self.o_cross_mlp = self.o_cross_mlp + self._o_input.pop(0).T @ y


class _observed:
    """Hooks gathering ``_Moments`` while a layer runs on the fit windows."""

    def __init__(self, o_proj, down_proj, session, layer, stats) -> None:
        branch = session.adapter.sub_block("mlp", session.model.config).output
        self.mlp = session.adapter.layers(session.model)[layer].get_submodule(branch)
        self.o_proj, self.down_proj, self.stats = o_proj, down_proj, stats

    def __enter__(self) -> None:
        stats = self.stats
        self.handles = [
            self.o_proj.register_forward_pre_hook(lambda m, a: stats.o_input(a[0])),
            self.down_proj.register_forward_pre_hook(lambda m, a: stats.down_input(a[0])),
            self.mlp.register_forward_hook(lambda m, a, out: stats.mlp_output(_first(out))),
        ]

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# --- judging candidates -------------------------------------------------------------------------
class Judge:
    """KL(dense ‖ candidate) on the judge windows (module docstring, 2).

    The *parent* (the search's current best) is kept assigned in the model with its input of
    every layer on every judge batch cached. A candidate is written over it only where it
    differs, runs from its first difference on, and is taken out again: a child of the parent
    costs the layers from its first mutation, whatever was judged before it."""

    def __init__(self, flow: Any, library: Library, top_k: int = 64) -> None:
        self.flow, self.library = flow, library
        self.session = flow.session
        self.goal = DenseKL(top_k)
        self.goal.prepare(flow.logits(flow.final()))
        self.parent: Genome = library.space.dense()
        self.inputs: list[list[torch.Tensor]] = []
        self.scores: dict[tuple[Genome, int], float] = {}
        self.evaluations = 0
        self.adopt(self.parent)

    @property
    def batches(self) -> int:
        return len(self.flow.batches)

    def adopt(self, genome: Genome) -> None:
        """Make ``genome`` the parent: assign it and cache its input of every layer."""
        self._write(self.parent, genome)
        self.parent = genome
        hidden = list(self.flow.inputs(0))
        self.inputs = [hidden]
        for index in range(self.flow.num_layers - 1):
            hidden = self.flow.run_unedited(index, hidden)
            self.inputs.append(hidden)

    def __call__(self, genome: Genome, batches: int | None = None) -> float:
        """The KL of ``genome`` on the first ``batches`` judge batches (all if None)."""
        count = self.batches if batches is None else min(batches, self.batches)
        if (genome, count) in self.scores:
            return self.scores[(genome, count)]
        changed = [i for i, (a, b) in enumerate(zip(self.parent, genome, strict=True)) if a != b]
        first = changed[0] if changed else self.flow.num_layers - 1
        self._write(self.parent, genome)
        try:
            hidden = self.inputs[first][:count]
            for index in range(first, self.flow.num_layers):
                hidden = self.flow.run_unedited(index, hidden)
            score = self._kl(hidden, count)
        finally:
            self._write(genome, self.parent)
        self.evaluations += 1
        self.scores[(genome, count)] = score
        return score

    def _kl(self, final: list[torch.Tensor], count: int) -> float:
        """KL on the first ``count`` batches (the reference holds one entry per window)."""
        reference = self.goal.reference
        self.goal.reference = reference[: sum(len(ids) for ids in self.flow.batches[:count])]
        try:
            return self.goal(self.flow.logits(final))
        finally:
            self.goal.reference = reference

    def _write(self, old: Genome, new: Genome) -> None:
        """Turn the model's layers from ``old``'s forms into ``new``'s where they differ."""
        model, adapter = self.session.model, self.session.adapter
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                self.library.assign(model, adapter, index, b)


# --- the evolution ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evolution:
    """EvoPress's settings: ``generations`` of ``offspring`` mutated candidates, selected in
    ``stages`` (judge batches used, survivors kept); ``tolerance``: how far beyond the budget
    a candidate may remove."""

    generations: int = 60
    offspring: int = 12
    stages: tuple[tuple[int, int], ...] = ((1, 4), (4, 1))
    tolerance: float = 0.01
    seed: int = 0


def evolve(
    judge: Judge, space: Space, goal: Goal, settings: Evolution, progress: bool = False
) -> dict[str, Any]:
    """The best candidate removing ``goal.amount`` (+ at most the tolerance), and its history."""
    rng = random.Random(settings.seed)
    parent = _start(judge, space, goal)
    fitness = judge(parent)
    history = [{"generation": 0, "kl": fitness, "removed": goal.removed(parent)}]
    start = time.perf_counter()
    bar = tqdm(range(1, settings.generations + 1), desc="search", disable=not progress,
               leave=False)  # fmt: skip
    for generation in bar:
        children = _offspring(parent, space, goal, settings, rng)
        best, score = _select(judge, children, settings.stages)
        if best is not None and score < fitness:
            parent, fitness = best, score
            judge.adopt(parent)
        history.append({"generation": generation, "kl": fitness})
        bar.set_postfix(kl=f"{fitness:.4f}")
        if generation % 10 == 0:
            log.info("search: generation %d, KL %.5f (%.0f s)", generation, fitness,
                     time.perf_counter() - start)  # fmt: skip
    return {"genome": parent, "kl": fitness, "history": history,
            "evaluations": judge.evaluations}  # fmt: skip


def _start(judge: Judge, space: Space, goal: Goal) -> Genome:
    """The first parent: the best of the tight near-uniform allocations (``_near_uniform``),
    one per attention level."""
    options = [g for kv in range(space.kv, -1, -1) if (g := _near_uniform(space, goal, kv))]
    if not options:
        raise ConfigError("The budget removes more than the whole decoder.")
    scored = [(judge(g), g) for g in options]
    best = min(scored)[1]
    judge.adopt(best)
    return best


def _near_uniform(space: Space, goal: Goal, kv: int) -> Genome | None:
    """Every layer at attention level ``kv`` and MLP level e or e + 1, as many as the goal
    allows at e + 1: removing just the goal. The outer layers (first and last) keep more: they
    are the most sensitive in every model we measured. None if even e = 0 falls short."""
    n = space.num_layers
    outer_first = sorted(range(n), key=lambda i: -abs(i - (n - 1) / 2))
    for eighths in range(MLP_STEPS, -1, -1):
        genome = [(kv, eighths)] * n
        if goal.removed(tuple(genome)) < goal.amount:
            continue
        if eighths == MLP_STEPS:
            return tuple(genome)
        for layer in outer_first:  # give back a level where the goal still holds
            trial = genome.copy()
            trial[layer] = (kv, eighths + 1)
            if goal.removed(tuple(trial)) >= goal.amount:
                genome = trial
        return tuple(genome)
    return None


def _offspring(parent: Genome, space: Space, goal: Goal, settings: Evolution, rng) -> list:
    """Mutated children that remove at least the goal (a budget is a promise: ``--ratio 0.2``
    never leaves more than 80%), and not more than the parent or the goal plus the tolerance
    (so a start above the budget may move towards it, never away)."""
    low = goal.amount
    high = max(goal.removed(parent), goal.amount * (1 + settings.tolerance))
    children, tries = [], 0
    while len(children) < settings.offspring and tries < 100 * settings.offspring:
        tries += 1
        child = _mutate(parent, space, rng)
        if child != parent and low <= goal.removed(child) <= high:
            children.append(child)
    return children


def _mutate(parent: Genome, space: Space, rng) -> Genome:
    """Level switch: one sublayer gives a level, another (possibly of the other kind) takes
    one."""
    genes = [list(g) for g in parent]
    top = (space.kv, MLP_STEPS)
    for direction in (-1, +1):
        layer, kind = rng.randrange(space.num_layers), rng.randrange(2)
        genes[layer][kind] = min(max(genes[layer][kind] + direction, 0), top[kind])
    return tuple(tuple(g) for g in genes)


def _select(judge: Judge, children: Sequence[Genome], stages) -> tuple[Genome | None, float]:
    """Multi-step selection: every child on a few batches, the best few on more, ..."""
    survivors = list(children)
    scores: dict[Genome, float] = {}
    for batches, keep in stages:
        scores = {g: judge(g, batches) for g in survivors}
        survivors = sorted(survivors, key=scores.get)[:keep]
    if not survivors:
        return None, math.inf
    best = survivors[0]
    return best, judge(best)


# --- the result ---------------------------------------------------------------------------------
def genome_plan(genome: Genome, library: Library, space: Space) -> Plan:
    """The ``Plan`` of a candidate: removed branches and blocks, and per-layer widths."""
    n = space.num_layers
    blocks = [i for i, (kv, e) in enumerate(genome) if kv == 0 and e == 0]
    attn = [i for i, (kv, e) in enumerate(genome) if kv == 0 and e > 0]
    mlp = [i for i, (kv, e) in enumerate(genome) if e == 0 and kv > 0]
    heads, channels = [], []
    for i, (kv, eighths) in enumerate(genome):
        variants = library.layers[i]
        drop_heads = 0 < kv < space.kv
        drop_channels = 0 < eighths < MLP_STEPS
        gone = space.channels - space.kept_channels(eighths)
        heads.append(tuple(sorted(variants.groups[: space.kv - kv].tolist())) if drop_heads else ())
        channels.append(tuple(sorted(variants.channels[:gone].tolist())) if drop_channels else ())
    return Plan(
        n, tuple(blocks), tuple(attn), tuple(mlp),
        heads=tuple(heads), channels=tuple(channels),
        num_heads=(space.kv,) * n, num_channels=(space.channels,) * n,
    )  # fmt: skip


def describe(genome: Genome, space: Space) -> list[dict[str, Any]]:
    """Per layer, what the search chose (for ``secateurs.json``)."""
    return [
        {"layer": i, "kv_groups": kv, "mlp_channels": space.kept_channels(e)}
        for i, (kv, e) in enumerate(genome)
    ]


def restore(model: Any, adapter: Any, library: Library) -> None:
    """Put the dense output projections back (the cut starts from the dense model)."""
    space = library.space
    for layer in range(space.num_layers):
        library.assign(model, adapter, layer, (space.kv, MLP_STEPS))


__all__ = ["Evolution", "Goal", "Judge", "Library", "Space", "evolve", "genome_plan", "space_of"]
