"""Depth pruning helpers behind ``secateurs.api.prune``: explicit selections and greedy search."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.depth_search import SearchState, greedy_search, step_scores, unit_params
from secateurs.errors import ConfigError
from secateurs.layerwise import LayerRunner
from secateurs.objectives import NLL, DenseKL
from secateurs.plan import RECORD_KEYS, Plan
from secateurs.units import Unit

SUBBLOCK = "subblock"  # attention and MLP branches ranked together under a parameter budget
SEARCH_KINDS = {"block": ("block",), "attn": ("attn",), "mlp": ("mlp",), SUBBLOCK: ("attn", "mlp")}


def parse_layer_list(text: str | Sequence[int] | None, what: str) -> tuple[int, ...]:
    """``"12,13,14"`` (or a sequence) → layer indices; None → ()."""
    if text is None:
        return ()
    if isinstance(text, str):
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError as err:
            raise ConfigError(
                f"--{what} takes layer indices like '12,13,14', not {text!r}."
            ) from err
    return tuple(int(i) for i in text)


def explicit_plan(
    num_layers: int,
    blocks: str | Sequence[int] | None = None,
    attn: str | Sequence[int] | None = None,
    mlp: str | Sequence[int] | None = None,
    plan: str | os.PathLike | dict | None = None,
) -> Plan | None:
    """The plan a user gave (``--blocks``/``--attn``/``--mlp``, or a plan JSON or a
    ``secateurs.json`` record of any kind: depth, width, experts or combined), or None."""
    given = [x for x in (blocks, attn, mlp) if x is not None]
    if plan is not None and given:
        raise ConfigError("Give either --plan or --blocks/--attn/--mlp, not both.")
    if plan is not None:
        data = plan if isinstance(plan, dict) else _read_plan(Path(plan))
        return given_plan(data, num_layers)
    if not given:
        return None
    return Plan(
        num_layers,
        parse_layer_list(blocks, "blocks"),
        parse_layer_list(attn, "attn"),
        parse_layer_list(mlp, "mlp"),
    )


def given_plan(data: dict[str, Any], num_layers: int) -> Plan:
    """A plan from JSON: a ``secateurs.json`` record (any version) or a bare plan, whose
    ``num_layers`` may be left out."""
    if any(key in data for key in RECORD_KEYS):
        chosen = Plan.of_record(data)
    else:
        chosen = Plan.from_dict({"num_layers": num_layers, **data})
    if chosen.num_layers != num_layers:
        raise ConfigError(
            f"The plan is for {chosen.num_layers} layers; the model has {num_layers}."
        )
    return chosen


def _read_plan(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"Cannot read plan file {path}: {err}") from err


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


def search_budget(
    model: PreTrainedModel,
    adapter: Adapter,
    unit: str,
    *,
    ratio: float | None,
    remove: int | None,
    params: int | None,
) -> tuple[int, str]:
    """The search budget and what it counts: units (one kind) or parameters (sub-blocks)."""
    if unit != SUBBLOCK:
        if params is not None:
            raise ConfigError("--params applies to --unit subblock; use --remove or --ratio.")
        return -1, "units"  # filled by the caller's count
    if sum(x is not None for x in (ratio, remove, params)) != 1:
        raise ConfigError("Give exactly one of ratio, remove (blocks' worth) or params.")
    blocks = [
        unit_params(model, adapter, Unit(i, "block")) for i in range(adapter.num_layers(model))
    ]
    if params is not None:
        budget = int(params)
    elif remove is not None:
        budget = round(remove * sum(blocks) / len(blocks))  # N average blocks' parameters
    else:
        if not 0 < ratio < 1:
            raise ConfigError(f"Ratio must be in (0, 1); got {ratio}.")
        budget = round(ratio * sum(blocks))
    if budget <= 0:
        raise ConfigError(f"The parameter budget must be positive; got {budget}.")
    return budget, "parameters"


def run_search(
    model: PreTrainedModel,
    adapter: Adapter,
    calibration: torch.Tensor,
    unit: str,
    protected: tuple[int, ...],
    budget: int,
    by: str,
    shortlist: int | None,
    batch_size: int = 8,
    progress: bool = True,
    objective: NLL | DenseKL | None = None,
) -> tuple[list[Unit], SearchState]:
    """Greedy search over ``unit`` candidates outside ``protected`` (see depth_search), by
    calibration NLL or another ``objective``."""
    num_layers = adapter.num_layers(model)
    candidates = [
        Unit(layer, kind)
        for layer in range(num_layers)
        if layer not in protected
        for kind in SEARCH_KINDS[unit]
    ]
    if by == "parameters":
        cost = {u: unit_params(model, adapter, u) for u in candidates}
    else:
        cost = {u: 1 for u in candidates}
    runner = LayerRunner(model, adapter, calibration, batch_size)
    state = greedy_search(runner, candidates, cost, budget, shortlist, progress, objective)
    return merge_branches(state.removed), state


def search_record(
    state: SearchState, unit: str, num_layers: int, shortlist: int | None
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
            kind: step_scores(state, 0, kind, num_layers).tolist() for kind in SEARCH_KINDS[unit]
        }
        if state.steps
        else {},
    }
