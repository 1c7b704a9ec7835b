"""Which units go: a ``Plan`` from a spec, by one of five strategies over the same pieces
(criteria on the flow, ``allocate``, ``search``).

- explicit: the plan the user gave (``--blocks`` / ``--attn`` / ``--mlp`` / ``--plan``);
- ranked: score every unit of each kind once, then allocate the budget (depth: the lowest
  count outside the protected layers; width: uniform or global; experts: uniform or global);
- iterative: re-score after each removal (depth, one kind);
- searched: the greedy search by calibration PPL or KL (``ppl --iterative``, ``subblock``);
- staged: blocks first (their share of the budget), then width ranked on the block-pruned model.

Every strategy returns a ``Choice``: the plan and the evidence the record keeps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from secateurs.allocate import Bounds, UnitTable, allocate, allocate_experts, unit_count
from secateurs.calibration import Windows
from secateurs.criteria import CRITERIA, Criterion, ScoringContext
from secateurs.criteria.base import input_statistics
from secateurs.defaults import SEARCH_OBJECTIVE, SUBBLOCK_SEARCH_OBJECTIVE
from secateurs.errors import ConfigError
from secateurs.objectives import objective
from secateurs.plan import (
    Plan,
    Unit,
    check_scores,
    lowest_unprotected,
    resolve_protected,
)
from secateurs.runinfo import count_parameters
from secateurs.scores import ScoreResult
from secateurs.search import greedy_search, merge_branches, search_record
from secateurs.sensitivity import layer_sensitivity
from secateurs.session.base import Session
from secateurs.spec import WIDTH_KINDS, PruneSpec, scores_file_for
from secateurs.targets import width_constraints
from secateurs.units import unit_cost
from secateurs.units import unit_count as units_in
from secateurs.units.experts import expert_plan, moe_layers, top_k
from secateurs.units.width import check_compensation

log = logging.getLogger(__name__)


@dataclass
class Choice:
    """A plan and the evidence behind it (for ``secateurs.json``)."""

    plan: Plan
    criterion: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # record keys a strategy adds
    scores: list[ScoreResult] = field(default_factory=list)
    means: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # for compensation
    seconds: float = 0.0


def choose(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """The plan of ``spec`` for ``session``'s model (see the module docstring)."""
    start = time.perf_counter()
    if spec.selection.explicit:
        choice = explicit(session, spec, windows)
    elif spec.joint:
        choice = joint(session, spec, windows)
    elif spec.combined:
        choice = staged(session, spec, windows)
    elif spec.experts:
        choice = ranked_experts(session, spec, windows)
    elif spec.width_kinds:
        choice = ranked_width(session, spec, windows, budget_params(session, spec))
    elif spec.searches:
        choice = searched(session, spec, windows)
    else:
        choice = ranked_depth(session, spec, windows)
    choice.seconds = time.perf_counter() - start
    return choice


# --- pieces ------------------------------------------------------------------------------------
def scorer_for(spec: PruneSpec, kind: str) -> Criterion:
    name = spec.criterion.width_name if kind in WIDTH_KINDS else spec.criterion.name
    options = spec.criterion.criterion_options() if len(set(spec.criterion.names)) == 1 else {}
    return CRITERIA.get(name)(**options)


def context(session: Session, scorer: Criterion, windows: Windows, removed=()) -> ScoringContext:
    """A scoring context with a flow over the scoring windows if the criterion reads data."""
    flow = (
        windows.flow(streams=scorer.streams(session.num_layers))
        if scorer.needs_calibration
        else None
    )
    if flow is not None:
        windows.used = windows.record()
    return ScoringContext(session, flow, tuple(removed), windows.progress)


def decoder_parameters(session: Session, include_embeddings: bool = False) -> int:
    """Parameters a ratio refers to: all, or all but token/position embeddings and the head."""
    model = session.model
    total = count_parameters(model)
    if include_embeddings:
        return total
    embedding = {
        id(p): p
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding)
        for p in m.parameters()
    }
    head = model.get_output_embeddings()
    if head is not None:
        embedding.update({id(p): p for p in head.parameters()})
    return total - sum(p.numel() for p in embedding.values())


def budget_params(session: Session, spec: PruneSpec) -> int:
    """The budget in parameters (``--ratio`` of the decoder's, or ``--params``)."""
    budget = spec.budget
    if budget.params is not None:
        return budget.params
    if budget.ratio is not None:
        return round(budget.ratio * decoder_parameters(session, budget.include_embeddings))
    raise ConfigError("This choice needs --ratio or --params (a parameter budget).")


def depth_count(session: Session, spec: PruneSpec, kind: str) -> int:
    """How many ``kind`` units ``--remove`` / ``--ratio`` / ``--params`` asks for."""
    if spec.budget.remove is not None:
        return spec.budget.remove
    costs = [unit_cost(session.model, session.adapter, i, kind) for i in range(session.num_layers)]
    return unit_count(budget_params(session, spec), costs, f"{kind} unit")


def protected(session: Session, spec: PruneSpec) -> tuple[int, ...]:
    return resolve_protected(spec.criterion.protected, session.num_layers)


def scored(scorer: Criterion, kind: str, ctx: ScoringContext, windows: Windows) -> ScoreResult:
    """One kind's depth scores (removed units excluded from the finiteness check)."""
    start = time.perf_counter()
    values = scorer.score(ctx, kind).to(torch.float64)
    live = [i for i in range(len(values)) if Unit(i, kind) not in ctx.removed]
    check_scores(values[live], scorer.name)
    return ScoreResult(
        scorer.name,
        kind,
        tuple(values.tolist()),
        scorer.options(),
        windows.used if ctx.flow is not None else None,
        time.perf_counter() - start,
        tuple(tuple(u) for u in ctx.removed),
    )


def criterion_record(spec: PruneSpec, scorer: Criterion, **more: Any) -> dict[str, Any]:
    return {
        "name": spec.criterion.given if not spec.selection.explicit else "explicit",
        "registered": scorer.name if scorer is not None else None,
        "options": scorer.options() if scorer is not None else {},
        **more,
    }


# --- explicit ----------------------------------------------------------------------------------
def explicit(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """The user's plan; a compensating width plan gets its means from the windows."""
    plan = spec.selection.plan_for(session.num_layers)
    choice = Choice(plan, {"name": "explicit", "protected": list(plan.protected)})
    if plan.compensate and plan.has_widths:
        ctx = ScoringContext(session, windows.flow(), (), windows.progress)
        kinds = [k for k in WIDTH_KINDS if any(plan.removed(k))]
        choice.means = {k: [s and s.mean for s in input_statistics(ctx, k)] for k in kinds}
        choice.calibration = windows.record()
    return choice


# --- depth -------------------------------------------------------------------------------------
def ranked_depth(
    session: Session, spec: PruneSpec, windows: Windows, count: int | None = None
) -> Choice:
    """Blocks, or one kind of branch: scored once (or re-scored after each removal)."""
    kind = spec.units[0]
    keep = protected(session, spec)
    count = depth_count(session, spec, kind) if count is None else count
    scorer = scorer_for(spec, kind)
    if spec.selection.scores is not None:
        history = [ScoreResult.from_dict(scores_file_for(spec, session.num_layers))]
    elif spec.selection.iterative:
        history = rescored(scorer, kind, count, keep, context(session, scorer, windows), windows)
    else:
        history = [scored(scorer, kind, context(session, scorer, windows), windows)]
    if spec.selection.iterative:
        chosen = [Unit(int(i), k) for i, k in history[-1].removed_before] + [_last(history, keep)]
    else:
        chosen = [Unit(i, kind) for i in lowest_unprotected(_values(history[0]), count, keep)]
    plan = Plan.of_units(session.num_layers, chosen, keep)
    record = criterion_record(
        spec, scorer, protected=list(keep), iterative=spec.selection.iterative
    )
    return Choice(plan, record, windows.used, {}, history)


def _values(result: ScoreResult) -> torch.Tensor:
    return torch.tensor(result.values, dtype=torch.float64)


def _last(history: list[ScoreResult], keep: tuple[int, ...]) -> Unit:
    last = history[-1]
    excluded = set(keep) | {int(layer) for layer, _ in last.removed_before}
    (layer,) = lowest_unprotected(_values(last), 1, excluded)
    return Unit(layer, last.unit)


def rescored(scorer, kind, count, keep, ctx, windows) -> list[ScoreResult]:
    """Re-score after each removal; each result knows what was removed before it."""
    history: list[ScoreResult] = []
    removed: list[Unit] = []
    for step in range(count):
        ctx.removed = tuple(removed)
        history.append(scored(scorer, kind, ctx, windows))
        if step + 1 < count:
            removed.append(_last(history, keep))
            log.info(
                "iterative: removed %s %d (step %d/%d)", kind, removed[-1].layer, step + 1, count
            )
    return history


# --- search ------------------------------------------------------------------------------------
def searched(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """The greedy search (``secateurs.search``) under a count or a parameter budget."""
    kinds, keep = spec.units, protected(session, spec)
    candidates = [Unit(i, k) for i in range(session.num_layers) if i not in keep for k in kinds]
    if len(kinds) == 1:
        budget, cost = depth_count(session, spec, kinds[0]), dict.fromkeys(candidates, 1)
    else:
        budget, cost = (
            subblock_budget(session, spec),
            {u: unit_cost(session.model, session.adapter, u.layer, u.kind) for u in candidates},
        )
    options = dict(spec.criterion.options)
    default = SUBBLOCK_SEARCH_OBJECTIVE if len(kinds) > 1 else SEARCH_OBJECTIVE
    extra = {"top_k": int(options["top_k"])} if "top_k" in options else {}
    goal = objective(str(options.get("objective", default)), **extra)
    start = time.perf_counter()
    flow = windows.flow(streams=len(candidates))
    state = greedy_search(flow, candidates, cost, budget, spec.selection.shortlist_count, goal)
    seconds = time.perf_counter() - start
    plan = Plan.of_units(session.num_layers, merge_branches(state.removed), keep)
    search = search_record(state, kinds, session.num_layers, spec.selection.shortlist_count)
    search["budget"] = {"value": budget, "counts": "units" if len(kinds) == 1 else "parameters"}
    history = [
        ScoreResult("ppl", kind, tuple(values), {"search": True, **goal.options()}, None, seconds)
        for kind, values in search["first_step_scores"].items()
    ]
    record = criterion_record(spec, None, protected=list(keep), iterative=True)
    record.update(registered="ppl", options=goal.options())
    return Choice(plan, record, windows.record(), {"search": search}, history)


def subblock_budget(session: Session, spec: PruneSpec) -> int:
    """Parameters the joint attention / MLP search removes: ``--params``, ``--remove`` N
    average blocks' worth, or ``--ratio`` of the decoder."""
    if spec.budget.remove is not None:
        blocks = [
            unit_cost(session.model, session.adapter, i, "block") for i in range(session.num_layers)
        ]
        return round(spec.budget.remove * sum(blocks) / len(blocks))
    return budget_params(session, spec)


# --- width -------------------------------------------------------------------------------------
def ranked_width(
    session: Session, spec: PruneSpec, windows: Windows, target: int, removed=()
) -> Choice:
    """Head groups / channels scored once, allocated under ``target`` parameters."""
    scorer = scorer_for(spec, spec.width_kinds[0])
    warn_if_unreconstructed(spec, scorer)
    alloc = spec.allocation
    gone = {u.layer for u in removed if u.kind == "block"}
    layers = [i for i in alloc.layer_range(session.num_layers) if i not in gone]
    compensating = compensates(spec, scorer)
    for kind in spec.width_kinds if compensating else ():
        check_compensation(session.model, session.adapter, kind)
    sensing = senses(spec, scorer, windows.available)
    needed = scorer.needs_calibration or compensating or sensing
    flow = windows.flow(streams=scorer.streams(session.num_layers)) if needed else None
    if flow is not None:
        windows.used = windows.record()
    ctx = ScoringContext(session, flow, tuple(removed), windows.progress)
    scores = {kind: scorer.score_width(ctx, kind) for kind in spec.width_kinds}
    means = input_means(ctx, spec.width_kinds) if compensating else {}
    ratio = target / decoder_parameters(session, spec.budget.include_embeddings)
    sensitivity = layer_sensitivity(flow, scores, layers, ratio) if sensing else None
    plan = width_plan(session, spec, scorer, scores, layers, target, compensating, sensitivity)
    extra = {
        "width_scores": {k: [v.tolist() for v in per] for k, per in scores.items()},
        "layer_sensitivity": sensitivity,
        "allocation_rule": allocation_rule(spec, scorer, sensitivity is not None),
    }
    details = {k: v for k, v in ctx.extras.items() if k != "input_mean"}
    record = criterion_record(spec, scorer, details=details)
    return Choice(plan, record, windows.used, extra, [], means)


def warn_if_unreconstructed(spec: PruneSpec, scorer: Criterion) -> None:
    if scorer.assumes_reconstruction and not spec.fit.reconstructing:
        log.warning(
            "%r ranks units by the loss after reconstruction re-fits what remains, and "
            "reconstruction is off: the pruned model will be much worse than the scores predict "
            "(SmolLM2-135M at LLM-Pruner's configuration, WikiText-2: 353 without, 143 with; "
            "docs/width.md). Drop --no-reconstruct, or use 'fluctuation' or 'hywia'.",
            scorer.name,
        )


def compensates(spec: PruneSpec, scorer: Criterion) -> bool:
    """FLAP's mean compensation: asked, or the criterion's default, and no reconstruction
    (whose intercept replaces it)."""
    asked = spec.fit.compensate
    wanted = bool(getattr(scorer, "compensate", False)) if asked is None else asked
    return wanted and not spec.fit.reconstructing


def senses(spec: PruneSpec, scorer: Criterion, windows: bool = True) -> bool:
    """Global allocation sized by measured per-layer sensitivity: as asked, else on unless
    the criterion's scores already are predicted loss changes (ranked per parameter) or no
    calibration windows can be had."""
    if spec.allocation.mode != "global":
        return False
    asked = spec.allocation.sensitivity
    if asked is None and not windows:
        log.info("no calibration windows (no tokenizer): global allocation without sensitivity")
        return False
    return (not scorer.loss_scores) if asked is None else asked


def input_means(ctx: ScoringContext, kinds: tuple[str, ...]) -> dict[str, list[torch.Tensor]]:
    """Each output projection's mean input (what compensation folds into the bias)."""
    known = ctx.extras.get("input_mean", {})
    measured = {k: known.get(k) or [s and s.mean for s in input_statistics(ctx, k)] for k in kinds}
    return measured


def width_plan(session, spec, scorer, scores, layers, target, compensating, sensitivity) -> Plan:
    tables = []
    for kind, per_layer in scores.items():
        for layer in layers:
            check_scores(per_layer[layer], scorer.name)
        costs = tuple(
            unit_cost(session.model, session.adapter, i, kind) for i in range(len(per_layer))
        )
        tables.append(UnitTable(kind, tuple(per_layer), costs))
    alloc = spec.allocation
    shape = width_constraints(
        alloc.target, unit="width" if len(scores) == 2 else next(iter(scores)),
        allocation=alloc.mode, layers=alloc.layers, round_to=alloc.round_to,
        uniform_widths=alloc.uniform_widths, compensate=compensating,
    )  # fmt: skip
    bounds = Bounds(alloc.min_ratio, alloc.max_ratio, shape["round_to"])
    removed = allocate(
        tables, target, layers, alloc.mode, bounds, shape["uniform_widths"], sensitivity,
        loss_scores=scorer.loss_scores,
    )  # fmt: skip
    n = session.num_layers
    counts = {
        t.kind: tuple(units_in(session.model, session.adapter, i, t.kind) for i in range(n))
        for t in tables
    }
    empty = tuple(() for _ in range(n))
    return Plan(
        num_layers=n,
        heads=tuple(removed.get("heads", empty)),
        channels=tuple(removed.get("channels", empty)),
        num_heads=counts.get("heads", (0,) * n),
        num_channels=counts.get("channels", (0,) * n),
        compensate=compensating,
    )


def allocation_rule(spec: PruneSpec, scorer: Criterion, sensed: bool) -> str:
    """How the layers' widths were decided, in words for ``secateurs.json``."""
    if spec.allocation.mode == "uniform":
        return "uniform: the same fraction in every pruned layer"
    if sensed:
        return "global: per-layer widths sized by measured loss sensitivity"
    if scorer.loss_scores:
        return "global: units ranked by predicted loss change per parameter"
    return "global: units ranked by per-layer standardised score"


# --- experts -----------------------------------------------------------------------------------
def ranked_experts(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """Routed experts scored per MoE layer, the lowest removed (uniform or global)."""
    scorer = scorer_for(spec, "experts")
    ctx = context(session, scorer, windows)
    scores = scorer.score_experts(ctx)
    for values in scores:
        check_scores(values, scorer.name)
    layers = moe_layers(session.model, session.adapter)
    floor = max(top_k(session.model, session.adapter), spec.allocation.min_keep, 1)
    per_layer, total = expert_amount(session, spec, layers)
    removed = allocate_experts(scores, per_layer, total, floor)
    plan = expert_plan(session.model, dict(zip(layers, removed, strict=True)))
    extra = {
        "experts": {"allocation": spec.allocation.mode, "min_keep": spec.allocation.min_keep},
        "expert_scores": {str(i): s.tolist() for i, s in zip(layers, scores, strict=True)},
    }
    if "expert_usage" in ctx.extras:
        extra["expert_usage"] = ctx.extras["expert_usage"]
    return Choice(plan, criterion_record(spec, scorer), windows.used, extra)


def expert_amount(session: Session, spec: PruneSpec, layers: list[int]) -> tuple[Any, Any]:
    """(experts per layer, None) for uniform allocation, (None, total experts) for global."""
    if spec.budget.remove is not None:
        return spec.budget.remove, None
    costs = [unit_cost(session.model, session.adapter, i, "experts") for i in layers]
    target = budget_params(session, spec)
    if spec.allocation.mode == "uniform":
        return unit_count(target / len(layers), costs, "expert per MoE layer"), None
    return None, unit_count(target, costs, "expert")


# --- staged: blocks, then width ------------------------------------------------------------------
def staged(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """Blocks and width under ONE parameter budget: ``depth_share`` of it as whole blocks
    (scored on the dense model), the rest as width scored and allocated on the model without
    them."""
    target = budget_params(session, spec)
    depth = ranked_depth(session, spec, windows, staged_blocks(session, spec, target))
    removed_params = sum(
        unit_cost(session.model, session.adapter, u.layer, "block") for u in depth.plan.units
    )
    width = ranked_width(session, spec, windows, target - removed_params, depth.plan.units)
    plan = depth.plan.merged(width.plan)
    record = {
        "name": spec.criterion.given,
        "block": depth.criterion,
        "width": width.criterion,
    }
    extra = {**width.extra}
    extra["parameters"] = {
        "removed_by_depth": removed_params,
        "depth_share": spec.allocation.depth_share,
    }
    return Choice(
        plan, record, width.calibration or depth.calibration, extra, depth.scores, width.means
    )


def staged_blocks(session: Session, spec: PruneSpec, target: int) -> int:
    """Blocks whose parameters make ``depth_share`` of the budget (blocks of average size)."""
    sizes = [
        unit_cost(session.model, session.adapter, i, "block") for i in range(session.num_layers)
    ]
    mean = sum(sizes) / len(sizes)
    share = spec.allocation.depth_share
    count = round(share * target / mean)
    if count < 1:
        raise ConfigError(
            f"A depth share of {share} of the budget is less than half a block; raise the "
            "ratio or the depth share (or prune width alone)."
        )
    if count * mean >= target:
        raise ConfigError(
            f"{count} blocks take the whole budget, leaving nothing for width; lower the depth "
            "share (or prune blocks alone)."
        )
    return count


# --- joint: every layer's form chosen together ---------------------------------------------------
def joint(session: Session, spec: PruneSpec, windows: Windows) -> Choice:
    """``--unit auto``: the evolutionary search of ``secateurs.evolve`` under the budget."""
    from secateurs.evolve import (
        Evolution,
        Judge,
        Library,
        describe,
        evolve,
        genome_plan,
        restore,
        space_of,
    )
    from secateurs.session.flow import Flow

    space = space_of(session.model, session.adapter)
    latency = None
    if spec.budget.latency is not None:  # seconds per token by the engine's latency table
        from secateurs.latency.budget import spec_budget

        latency = spec_budget(space, spec.budget, session.model.config)
    goal = latency.goal() if latency else space.parameters(budget_params(session, spec))
    scorer = scorer_for(spec, "heads")
    ctx = context(session, scorer, windows)
    rankings = {kind: scorer.score_width(ctx, kind) for kind in WIDTH_KINDS}
    fit_count, judge_count = spec.fit.reconstruct_samples, spec.selection.judge_samples
    tokens = windows.tokens(fit_count + judge_count)  # disjoint: fit first, judge last
    start = time.perf_counter()
    library = Library(space, spec.fit.reconstruct_damping)
    library.build(
        Flow(session, tokens[:fit_count], spec.data.batch_size, windows.progress), rankings
    )
    judge = Judge(Flow(session, tokens[fit_count:], 1), library)  # stages count windows
    settings = Evolution(generations=spec.selection.generations, seed=spec.data.seed)
    found = evolve(judge, space, goal, settings, windows.progress)
    restore(session.model, session.adapter, library)
    plan = genome_plan(found["genome"], library, space)
    search = {
        "kind": "evolutionary (EvoPress-style level switch, KL from dense)",
        "layers": describe(found["genome"], space),
        "predicted_kl": found["kl"],
        "history": found["history"],
        "evaluations": found["evaluations"],
        "windows": {"fit": fit_count, "judge": judge_count},
        "budget": {
            "value": goal.amount,
            "counts": goal.unit,
            "removed": goal.removed(found["genome"]),
            "parameters_removed": space.removed(found["genome"]),
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    if latency is not None:
        search["latency"] = latency.record(found["genome"])
    details = {k: v for k, v in ctx.extras.items() if k != "input_mean"}
    record = criterion_record(spec, scorer, details=details)
    return Choice(plan, record, windows.record(), {"search": search})
