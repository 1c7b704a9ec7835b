"""Greedy depth search by calibration perplexity (SLEB / BlockPruner), at one-shot cost.

Each step removes the candidate whose removal (with those already removed) gives the lowest
calibration NLL. Costs are kept near a one-shot pass by the flow (``session.flow``): layer inputs
are cached, so a candidate at layer c runs only layers c.. and the head; after a removal at
layer c only the inputs of layers c.. are recomputed (earlier ones never change); all of a
step's candidates advance in lockstep (each layer loaded once per step from disk); and after the
first (full, one-shot) step only a ``shortlist`` of candidates is re-scored: those whose last
measured NLL increase over the then-current model was smallest. ``shortlist=None`` re-scores
every candidate every step (exact greedy); ``shortlist=0`` never re-scores (one-shot ranking).

"NLL" here is the search's objective (``secateurs.objectives``): the calibration NLL by default,
or the KL divergence from the dense model's predictions (``objective=kl``).

Candidates are blocks (``kinds=("block",)``) or, for the joint sub-block search of BlockPruner,
attention and MLP branches ranked together (``kinds=("attn", "mlp")``) under a parameter budget;
a layer that loses both branches is reported as a removed block.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.edits import Perturbation, Removal
from secateurs.errors import ConfigError
from secateurs.objectives import NLL, DenseKL, measure, prepare
from secateurs.plan import Unit
from secateurs.session.flow import Flow

log = logging.getLogger(__name__)


def unit_params(model: PreTrainedModel, adapter: Adapter, unit: Unit) -> int:
    """Parameters a unit's removal takes away (its modules, norms included)."""
    modules = adapter.unit_modules(model, unit.layer, unit.kind)
    return sum(p.numel() for m in modules for p in m.parameters())


@dataclass
class SearchState:
    """What the search knows: the latest NLL of each candidate and the base it was measured on."""

    removed: list[Unit] = field(default_factory=list)
    objective: NLL | DenseKL = field(default_factory=NLL)  # what "NLL" below means
    base: float = 0.0  # NLL of the model with ``removed`` gone
    measured: dict[Unit, tuple[float, float]] = field(default_factory=dict)  # (nll, base then)
    steps: list[dict] = field(default_factory=list)  # per step: chosen, NLLs scored this step

    def increase(self, unit: Unit) -> float:
        nll, base = self.measured[unit]
        return nll - base


def greedy_search(
    flow: Flow,
    candidates: list[Unit],
    cost: dict[Unit, int],
    budget: int,
    shortlist: int | None = 3,
    objective: NLL | DenseKL | None = None,
) -> SearchState:
    """Remove candidates greedily until their ``cost`` adds up to ``budget`` (see module doc).

    A candidate fits while its cost is at most the remaining budget plus half the smallest
    candidate's cost, so a parameter budget is met to within half a branch.
    """
    if shortlist is not None and shortlist < 0:
        raise ConfigError(f"shortlist must be >= 0 (or None for all); got {shortlist}.")
    slack = min(cost.values()) // 2
    state = SearchState(objective=objective or NLL())
    flow.keep_inputs = True
    flow.set_base(())
    prepare(flow, state.objective)
    state.base = measure(flow, state.objective, [Perturbation(flow.num_layers - 1)])[0]
    spent = 0
    with tqdm(total=budget, desc="depth search", disable=not flow.progress, leave=False) as bar:
        while True:
            live = [c for c in candidates if c not in state.removed]
            fits = [c for c in live if cost[c] <= budget - spent + slack]
            fits = _drop_last_block(fits, state.removed, flow.num_layers)
            if not fits:
                break
            choice = _step(flow, state, fits, shortlist)
            spent += cost[choice]
            bar.update(cost[choice])
    return state


def _drop_last_block(fits: list[Unit], removed: list[Unit], num_layers: int) -> list[Unit]:
    """At least one block must remain: never remove the last layer with anything left."""
    gone = {u.layer for u in removed if u.kind == "block"}
    for layer in range(num_layers):
        kinds = {u.kind for u in removed if u.layer == layer}
        if kinds == {"attn", "mlp"}:
            gone.add(layer)
    if len(gone) < num_layers - 1:
        return fits
    return [u for u in fits if u.kind != "block" and u.layer in gone]


def _step(flow: Flow, state: SearchState, fits: list[Unit], shortlist: int | None) -> Unit:
    first = not state.steps
    if first or shortlist is None:
        to_score = fits
    else:
        to_score = sorted(fits, key=lambda u: (state.increase(u), u))[:shortlist]
    flow.set_base(state.removed)
    models = [Perturbation(u.layer, {u.layer: Removal(u.kind)}) for u in to_score]
    scored = dict(zip(to_score, measure(flow, state.objective, models), strict=True))
    for unit, value in scored.items():
        state.measured[unit] = (value, state.base)
    if shortlist == 0 and not first:  # one-shot: the step-1 ranking decides
        choice = min(fits, key=lambda u: (state.increase(u), u))
    else:
        choice = min(scored, key=lambda u: (scored[u], u))
    state.removed.append(choice)
    state.base = state.measured[choice][0]
    state.steps.append({"chosen": list(choice), "nll": {_key(u): v for u, v in scored.items()}})
    log.info(
        "search: removed %s %d (%s %.3f)",
        choice.kind,
        choice.layer,
        state.objective.label,
        state.objective.shown(state.base),
    )
    return choice


def _key(unit: Unit) -> str:
    return f"{unit.kind}:{unit.layer}"


def step_scores(state: SearchState, step: int, kind: str, num_layers: int) -> torch.Tensor:
    """Per-layer score of ``kind`` units measured at ``step`` (inf where not scored then): the
    calibration PPL (``nll``) or KL from dense (``kl``)."""
    values = torch.full((num_layers,), math.inf, dtype=torch.float64)
    for key, nll in state.steps[step]["nll"].items():
        unit_kind, layer = key.split(":")
        if unit_kind == kind:
            values[int(layer)] = state.objective.shown(nll)
    return values


def merge_branches(units: Sequence[Unit]) -> list[Unit]:
    """A layer whose attention and MLP both go is a removed block."""
    kinds: dict[int, set[str]] = {}
    for unit in units:
        kinds.setdefault(unit.layer, set()).add(unit.kind)
    merged = []
    for layer, found in sorted(kinds.items()):
        if "block" in found or found >= {"attn", "mlp"}:
            merged.append(Unit(layer, "block"))
        else:
            merged.extend(Unit(layer, kind) for kind in sorted(found))
    return merged


def search_record(
    state: SearchState, kinds: tuple[str, ...], num_layers: int, shortlist: int | None
) -> dict[str, Any]:
    """What the search did, for secateurs.json: order, PPL after each step, every step's scores."""
    return {
        "order": [list(u) for u in state.removed],
        "shortlist": shortlist,
        "objective": state.objective.options(),
        "calibration_" + ("ppl" if state.objective.name == "nll" else state.objective.name): [
            state.objective.shown(state.measured[u][0]) for u in state.removed
        ],
        "scored_per_step": [len(step["nll"]) for step in state.steps],
        "steps": state.steps,
        "first_step_scores": {
            kind: step_scores(state, 0, kind, num_layers).tolist() for kind in kinds
        }
        if state.steps
        else {},
    }
