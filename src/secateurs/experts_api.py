"""Expert pruning end to end: score every routed expert, allocate, cut, save.

    model, tokenizer = load_model("path/to/moe")
    result = prune_experts(model, tokenizer, criterion="reap", ratio=0.25, out="pruned/")

``ratio`` is a fraction of the routed experts of the MoE layers; ``remove`` a count per layer
(uniform). ``uniform`` removes the same count from every MoE layer (the checkpoint loads with
plain transformers); ``global`` ranks all experts together after dividing each layer's scores by
their mean, keeping at least top-k experts (and ``min_keep``) per layer.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.adapters import Adapter, adapter_for
from secateurs.checkpoint import check_output_dir
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.experts import expert_layout, expert_plan, moe_layers, top_k
from secateurs.plan import Plan, check_scores
from secateurs.prune_flow import PruneResult, finish, run_record
from secateurs.runinfo import calibration_tokens as _calibration
from secateurs.runinfo import count_parameters
from secateurs.surgery import apply_plan

log = logging.getLogger(__name__)

EXPERT_ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class ExpertOptions:
    """How many experts go and where; validated on creation (before any work)."""

    ratio: float | None = None
    remove: int | None = None
    allocation: str = "uniform"
    min_keep: int = 0  # least experts kept per layer (top-k is always a floor too)

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.remove is None):
            raise ConfigError("Expert pruning takes --ratio (of the experts) or --remove N.")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError(f"Expert ratio must be in (0, 1); got {self.ratio}.")
        if self.remove is not None and self.remove <= 0:
            raise ConfigError(f"--remove must be a positive count of experts; got {self.remove}.")
        if self.allocation not in EXPERT_ALLOCATIONS:
            raise ConfigError(
                f"Unknown allocation {self.allocation!r}; expected one of {EXPERT_ALLOCATIONS}."
            )
        if self.remove is not None and self.allocation != "uniform":
            raise ConfigError("--remove N counts experts per layer: use --allocation uniform.")


def allocate_experts(
    scores: list[torch.Tensor], options: ExpertOptions, floor: int
) -> list[tuple[int, ...]]:
    """Experts to remove per MoE layer (lowest scores first; ties: lower index first)."""
    counts = [len(s) for s in scores]
    if options.allocation == "uniform":
        return _uniform(scores, _per_layer_count(counts, options), floor)
    total = round(options.ratio * sum(counts))
    return _global(scores, total, floor)


def _per_layer_count(counts: list[int], options: ExpertOptions) -> int:
    if options.remove is not None:
        return options.remove
    n = round(options.ratio * min(counts))
    if n == 0:
        raise ConfigError(f"Ratio {options.ratio} of {min(counts)} experts removes none.")
    return n


def _lowest(values: torch.Tensor, count: int) -> tuple[int, ...]:
    order = sorted(range(len(values)), key=lambda i: (float(values[i]), i))
    return tuple(sorted(order[:count]))


def _uniform(scores: list[torch.Tensor], n: int, floor: int) -> list[tuple[int, ...]]:
    for values in scores:
        if len(values) - n < floor:
            raise ConfigError(
                f"Removing {n} of {len(values)} experts per layer leaves {len(values) - n}; the "
                f"router needs at least {floor} (top-k / --min-keep). Lower the amount."
            )
    return [_lowest(values, n) for values in scores]


def _global(scores: list[torch.Tensor], total: int, floor: int) -> list[tuple[int, ...]]:
    room = [len(v) - floor for v in scores]
    if total <= 0 or total > sum(max(r, 0) for r in room):
        raise ConfigError(
            f"Cannot remove {total} experts while keeping {floor} per layer "
            f"(at most {sum(max(r, 0) for r in room)} are removable)."
        )
    ranked = []
    for layer, values in enumerate(scores):
        mean = values.abs().mean()
        norm = values / mean if mean > 0 else torch.zeros_like(values)
        ranked += [(float(norm[e]), layer, e) for e in range(len(values))]
    removed: list[list[int]] = [[] for _ in scores]
    for _, layer, expert in sorted(ranked):
        if sum(map(len, removed)) == total:
            break
        if len(removed[layer]) < room[layer]:
            removed[layer].append(expert)
    return [tuple(sorted(r)) for r in removed]


def prune_experts(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    *,
    criterion: str = "reap",
    options: ExpertOptions | None = None,
    calibration: Any = None,
    data_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    **criterion_options: Any,
) -> PruneResult:
    """Score, allocate and remove routed experts of ``model`` (in place); save to ``out``."""
    opts = options or ExpertOptions(ratio=0.25)
    if out is not None:
        check_output_dir(out, overwrite)
    adapter = adapter_for(model)
    scorer = _checked_scorer(criterion, criterion_options)
    check_observable(adapter, model.config, scorer)
    tokens, calib_record = _calibration(scorer.needs_calibration, calibration, tokenizer, data_root)
    layers = moe_layers(model, adapter)
    floor = max(top_k(model, adapter), opts.min_keep, 1)
    before = count_parameters(model)
    start = time.perf_counter()
    ctx = ScoringContext(model.eval(), adapter, tokens, batch_size, (), progress)
    scores = scorer.score_experts(ctx)
    seconds = time.perf_counter() - start
    for values in scores:
        check_scores(values, scorer.name)
    removed = allocate_experts(scores, opts, floor)
    plan = expert_plan(model, dict(zip(layers, removed, strict=True)))
    apply_plan(model, plan, adapter)
    log.info(
        "removed %d experts; parameters %d -> %d",
        sum(map(len, plan.experts)),
        before,
        count_parameters(model),
    )
    record = experts_record(
        model, plan, scorer, opts, scores, (calib_record, before, seconds, source), ctx.extras
    )
    return finish(model, tokenizer, plan, record, out=out, overwrite=overwrite)


def experts_record(
    model: PreTrainedModel,
    plan: Plan,
    scorer: Any,
    opts: ExpertOptions,
    scores: list[torch.Tensor],
    run: tuple[dict[str, Any] | None, int, float, str | None],
    extras: dict[str, Any],
) -> dict[str, Any]:
    """The record of an expert-pruning run (``model`` already pruned); ``run`` is (calibration
    record, parameters before, scoring seconds, source). Shared by the layer-by-layer path."""
    calibration, before, seconds, source = run
    layers = plan.expert_layers
    record = run_record(
        model,
        plan,
        criterion={"name": scorer.name, "options": scorer.options()},
        calibration=calibration,
        before=before,
        seconds=seconds,
        source=source,
        experts=asdict(opts),
        expert_scores={str(i): s.tolist() for i, s in zip(layers, scores, strict=True)},
    )
    if "expert_usage" in extras:
        record["expert_usage"] = extras["expert_usage"]
    return record


def check_observable(adapter: Adapter, config: Any, scorer: Any) -> None:
    """Refuse (before any work) a dense or unsupported model, and a routing criterion on
    experts that are not called with the routing."""
    layout = expert_layout(adapter, config)
    if scorer.needs_calibration and not layout.observable:
        raise UnsupportedModelError(
            f"{config.model_type}: its experts are not called with the routing "
            f"(hidden, top-k ids, weights), so {scorer.name!r} cannot observe them; "
            "use --criterion magnitude."
        )


def _checked_scorer(criterion: str, options: dict[str, Any]):
    name = CRITERIA.canonical(criterion.rstrip("+"))
    scorer = CRITERIA.get(name)(**options)
    if "experts" not in scorer.units:
        experts = sorted(n for n, c in CRITERIA.items() if "experts" in c.units)
        raise ConfigError(f"Criterion {name!r} cannot score experts; use one of {experts}.")
    return scorer
