"""Width pruning end to end: validate, score head groups / channels, allocate, cut, save.

    model, tokenizer = load_model("smollm2-135m")
    result = prune_width(model, tokenizer, criterion="fluctuation", unit="width", ratio=0.2,
                         allocation="global", out="pruned/")

``ratio`` is a fraction of the model's parameters excluding embeddings (unless
``include_embeddings``); the achieved fraction is recorded exactly.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.adapters import Adapter, adapter_for
from secateurs.allocation import ALLOCATIONS, Bounds, UnitTable, allocate
from secateurs.checkpoint import check_output_dir
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.criteria.base import input_statistics
from secateurs.data import CalibrationConfig
from secateurs.errors import ConfigError
from secateurs.plan import Plan, check_scores
from secateurs.prune_flow import PruneResult, finish, run_record
from secateurs.reconstruct import prune_and_reconstruct
from secateurs.runinfo import calibration_tokens as _calibration
from secateurs.runinfo import count_parameters
from secateurs.sensitivity import layer_sensitivity
from secateurs.surgery import apply_plan
from secateurs.width import check_compensation, unit_cost, update_config, widths

log = logging.getLogger(__name__)

# Decided by benchmarks/width.py: reconstruction lowers WikiText-2 / PTB perplexity for every
# criterion at LLM-Pruner's configuration (docs/width.md).
RECONSTRUCT_DEFAULT = True

WIDTH_UNITS: dict[str, tuple[str, ...]] = {
    "heads": ("heads",),
    "channels": ("channels",),
    "width": ("heads", "channels"),
}


@dataclass(frozen=True)
class WidthOptions:
    """How much to remove and where; validated on creation (before any work)."""

    unit: str = "width"
    ratio: float = 0.2
    allocation: str = "uniform"
    layers: tuple[int, int] | None = None  # [start, stop) of layers that may be pruned
    min_ratio: float = 0.0
    max_ratio: float = 0.9
    round_to: int = 1
    uniform_widths: bool | tuple[str, ...] = False  # True, or the kinds to keep uniform
    include_embeddings: bool = False
    # Fold the removed units' mean contribution into the output bias (FLAP's compensation) for
    # any criterion; None: the criterion's own default (on for fluctuation, off otherwise).
    compensate: bool | None = None
    # Re-fit the kept columns of every pruned output projection by damped least squares on
    # calibration activations (``secateurs.reconstruct``); the intercept of that fit replaces
    # FLAP's compensation (off with compensate=False). None: the default below.
    reconstruct: bool | None = None
    reconstruct_damping: float = 0.01
    reconstruct_samples: int = 64  # calibration windows for the fit (at least the scoring ones)
    # Global allocation sized by per-layer sensitivity measured on the calibration loss
    # (``secateurs.sensitivity``); None: on where calibration data can be had, except for
    # criteria whose scores are predicted loss changes (ranked per parameter as they are).
    sensitivity: bool | None = None

    def __post_init__(self) -> None:
        if self.unit not in WIDTH_UNITS:
            raise ConfigError(
                f"Unknown width unit {self.unit!r}; expected one of {list(WIDTH_UNITS)}."
            )
        if not 0 < self.ratio < 1:
            raise ConfigError(
                f"Ratio must be a fraction of parameters in (0, 1); got {self.ratio}."
            )
        if self.allocation not in ALLOCATIONS:
            raise ConfigError(
                f"Unknown allocation {self.allocation!r}; expected one of {ALLOCATIONS}."
            )
        if self.uniform_widths and self.allocation != "global":
            raise ConfigError("uniform_widths rounds a global allocation; use allocation='global'.")
        Bounds(self.min_ratio, self.max_ratio, self.round_to)
        if not self.reconstruct_damping >= 0:
            raise ConfigError(
                f"Reconstruction damping must be ≥ 0; got {self.reconstruct_damping}."
            )
        if self.reconstruct_samples < 1:
            raise ConfigError(
                f"Reconstruction needs ≥ 1 calibration sample; got {self.reconstruct_samples}."
            )

    @property
    def reconstructing(self) -> bool:
        return RECONSTRUCT_DEFAULT if self.reconstruct is None else self.reconstruct

    @property
    def kinds(self) -> tuple[str, ...]:
        return WIDTH_UNITS[self.unit]

    def layer_range(self, num_layers: int) -> list[int]:
        start, stop = self.layers or (0, num_layers)
        if not 0 <= start < stop <= num_layers:
            raise ConfigError(f"Layer range {start}:{stop} is not inside 0:{num_layers}.")
        return list(range(start, stop))


def parse_layers(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``--layers 4:28`` → (4, 28); None means every layer."""
    if text is None or isinstance(text, tuple):
        return text
    start, sep, stop = text.partition(":")
    try:
        return (int(start or 0), int(stop)) if sep else (int(start), int(start) + 1)
    except ValueError as err:
        raise ConfigError(f"--layers takes START:STOP (e.g. 4:28), not {text!r}.") from err


def prune_width(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    *,
    criterion: str = "fluctuation",
    options: WidthOptions | None = None,
    calibration: Any = None,
    data_root: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    batch_size: int = 1,
    **criterion_options: Any,
) -> PruneResult:
    """Score, allocate and remove head groups / MLP channels of ``model`` (in place)."""
    opts = _resolved(options or WidthOptions(), calibration, tokenizer)
    if out is not None:
        check_output_dir(out, overwrite)
    adapter = adapter_for(model)
    scorer = _checked_scorer(model, adapter, criterion, opts, criterion_options)
    layers = opts.layer_range(adapter.num_layers(model))
    base, before = parameter_base(model, opts.include_embeddings), count_parameters(model)
    compensating = _compensating(scorer, opts) and not opts.reconstructing
    sensing = _sensing(opts, scorer)
    opts = replace(opts, sensitivity=sensing)  # the record says what was done
    needs_data = scorer.needs_calibration or compensating or opts.reconstructing or sensing
    tokens, calib_record = _calibration(needs_data, calibration, tokenizer, data_root)
    ctx = ScoringContext(model.eval(), adapter, tokens, batch_size, (), progress)
    start = time.perf_counter()
    scores = {kind: scorer.score_width(ctx, kind) for kind in opts.kinds}
    if compensating:
        ensure_input_means(ctx, opts.kinds)
    seconds = time.perf_counter() - start
    target = round(opts.ratio * base)
    sensitivity = layer_sensitivity(ctx, scores, layers, opts.ratio) if sensing else None
    plan = _plan(model, adapter, scores, opts, layers, target, scorer, compensating, sensitivity)
    if opts.reconstructing:
        fit = _calibration(True, _fit_calibration(calibration, opts), tokenizer, data_root)[0]
        reconstruction = reconstruct_plan(model, plan, fit, opts, adapter, progress)
    else:
        means = ctx.extras.get("input_mean", {}) if plan.compensate else {}
        apply_plan(model, plan, adapter, means)
        reconstruction = {"enabled": False}
    record = width_record(
        model,
        plan,
        scorer,
        opts,
        scores,
        calib_record,
        (before, base, seconds),
        source,
        details=criterion_details(ctx.extras),
        reconstruction=reconstruction,
        layer_sensitivity=sensitivity,
        allocation_rule=allocation_rule(opts, scorer, sensitivity is not None),
    )
    return finish(model, tokenizer, plan, record, out=out, overwrite=overwrite)


def _resolved(opts: WidthOptions, calibration: Any, tokenizer: Tokenizer | None) -> WidthOptions:
    """Resolve ``reconstruct=None``: on by default, off where no calibration can be had (a
    data-free criterion called without a tokenizer or calibration tensor)."""
    able = isinstance(calibration, torch.Tensor) or tokenizer is not None
    if not able and None in (opts.reconstruct, opts.sensitivity):
        log.info("no calibration data (no tokenizer, no tensor): no reconstruction/sensitivity")
    reconstruct = RECONSTRUCT_DEFAULT and able if opts.reconstruct is None else opts.reconstruct
    sensitivity = (None if able else False) if opts.sensitivity is None else opts.sensitivity
    return replace(opts, reconstruct=reconstruct, sensitivity=sensitivity)


def allocation_rule(opts: WidthOptions, scorer: Any, sensed: bool) -> str:
    """How the layers' widths were decided, in words for ``secateurs.json``."""
    if opts.allocation == "uniform":
        return "uniform: the same fraction in every pruned layer"
    if sensed:
        return "global: per-layer widths sized by measured loss sensitivity"
    if scorer.loss_scores:
        return "global: units ranked by predicted loss change per parameter"
    return "global: units ranked by per-layer standardised score"


def _sensing(opts: WidthOptions, scorer: Any) -> bool:
    """Whether global allocation measures per-layer sensitivity: as asked, else on unless the
    criterion's scores already are predicted loss changes (``Criterion.loss_scores``)."""
    if opts.allocation != "global":
        return False
    if opts.sensitivity is not None:
        return opts.sensitivity
    return not scorer.loss_scores


def _checked_scorer(model, adapter: Adapter, criterion: str, opts: WidthOptions, options: dict):
    name = CRITERIA.canonical(criterion.rstrip("+"))
    scorer = CRITERIA.get(name)(**options)
    for kind in opts.kinds:
        adapter.width_layout(kind, model.config)  # no width support here → clear error
        if kind not in scorer.units:
            raise ConfigError(
                f"Criterion {name!r} cannot score {kind!r}; it scores {sorted(scorer.units)}."
            )
        if _compensating(scorer, opts) and not opts.reconstructing:
            check_compensation(model, adapter, kind)
    _warn_if_unreconstructed(scorer, opts)
    return scorer


def _warn_if_unreconstructed(scorer, opts: WidthOptions) -> None:
    if scorer.assumes_reconstruction and not opts.reconstructing:
        log.warning(
            "%r ranks units by the loss after reconstruction re-fits what remains, and "
            "reconstruction is off: the pruned model will be much worse than the scores predict "
            "(SmolLM2-135M at LLM-Pruner's configuration, WikiText-2: 353 without, 143 with; "
            "docs/width.md). Drop --no-reconstruct, or use 'fluctuation' or 'hywia'.",
            scorer.name,
        )


def _compensating(scorer, opts: WidthOptions) -> bool:
    if opts.compensate is not None:
        return opts.compensate
    return bool(getattr(scorer, "compensate", False))


def _fit_calibration(calibration: Any, opts: WidthOptions) -> Any:
    """The calibration for reconstruction: the scoring one, with at least
    ``reconstruct_samples`` windows (a least-squares fit wants many more tokens than scoring)."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    config = calibration or CalibrationConfig()
    return replace(config, n_samples=max(config.n_samples, opts.reconstruct_samples))


def reconstruct_plan(
    model: PreTrainedModel,
    plan: Plan,
    tokens: torch.Tensor,
    opts: WidthOptions,
    adapter: Adapter | None = None,
    progress: bool = False,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Cut ``plan`` out of ``model`` layer by layer, re-fitting each output projection on
    ``tokens`` (see ``secateurs.reconstruct``); returns the record for ``secateurs.json``."""
    adapter = adapter or adapter_for(model)
    original = widths(model, adapter)[0]
    batches = [tokens[i : i + batch_size] for i in range(0, len(tokens), batch_size)]
    bar = (lambda it: tqdm(it, desc="reconstruct", leave=False)) if progress else None
    intercept = opts.compensate is not False
    report = prune_and_reconstruct(
        model, adapter, plan, batches, opts.reconstruct_damping, intercept, bar
    )
    update_config(model, adapter, original)
    log.info("reconstruction: %d layers re-fitted in %.1f s", len(report.layers), report.seconds)
    return {"enabled": True, "samples": len(tokens), **report.to_dict()}


def ensure_input_means(ctx: ScoringContext, kinds: tuple[str, ...]) -> None:
    """Mean inputs of each output projection, for compensation (one pass if not yet known)."""
    means = ctx.extras.setdefault("input_mean", {})
    for kind in kinds:
        if kind not in means:
            means[kind] = [s.mean for s in input_statistics(ctx, kind, "compensation: means")]


def _plan(
    model,
    adapter,
    scores,
    opts: WidthOptions,
    layers,
    target,
    scorer,
    compensate=None,
    sensitivity=None,
) -> Plan:
    tables = []
    for kind, per_layer in scores.items():
        for values in per_layer:
            check_scores(values, scorer.name)
        costs = tuple(unit_cost(model, adapter, i, kind) for i in range(len(per_layer)))
        tables.append(UnitTable(kind, tuple(per_layer), costs))
    bounds = Bounds(opts.min_ratio, opts.max_ratio, opts.round_to)
    removed = allocate(
        tables,
        target,
        layers,
        opts.allocation,
        bounds,
        opts.uniform_widths,
        sensitivity,
        loss_scores=scorer.loss_scores,
    )
    n = len(tables[0].scores)
    empty: tuple[tuple[int, ...], ...] = tuple(() for _ in range(n))
    counts = {t.kind: tuple(len(v) for v in t.scores) for t in tables}
    return Plan(
        num_layers=n,
        heads=tuple(removed.get("heads", empty)),
        channels=tuple(removed.get("channels", empty)),
        num_heads=counts.get("heads", (0,) * n),
        num_channels=counts.get("channels", (0,) * n),
        compensate=_compensating(scorer, opts) if compensate is None else compensate,
    )


def parameter_base(model: PreTrainedModel, include_embeddings: bool) -> int:
    """Parameters the ratio refers to: all, or all but token/position embeddings and lm_head."""
    total = count_parameters(model)
    if include_embeddings:
        return total
    embedding = {
        id(p): p for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    head = model.get_output_embeddings()
    if head is not None:
        embedding.update({id(p): p for p in head.parameters()})
    return total - sum(p.numel() for p in embedding.values())


def criterion_details(extras: dict[str, Any]) -> dict[str, Any]:
    """What a criterion left for inspection (e.g. HyWIA's fusion weights), minus bulky tensors."""
    return {key: value for key, value in extras.items() if key != "input_mean"}


def width_record(
    model: PreTrainedModel,
    plan: Plan,
    scorer: Any,
    opts: WidthOptions,
    scores: dict[str, list[torch.Tensor]],
    calibration: dict[str, Any] | None,
    counts: tuple[int, int, float],
    source: str | None,
    details: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The run record (``prune_flow.run_record``) of a width pruning; ``counts`` are
    (parameters before, the ratio's base, scoring seconds)."""
    before, base, seconds = counts
    after = count_parameters(model)
    achieved = (before - after) / base
    log.info(
        "removed %d parameters: %.4f of the %s (asked %.4f)",
        before - after,
        achieved,
        "parameters" if opts.include_embeddings else "non-embedding parameters",
        opts.ratio,
    )
    criterion = {"name": scorer.name, "options": scorer.options()}
    if details is not None:
        criterion["details"] = details
    parameters = {
        "base": base,
        "base_excludes_embeddings": not opts.include_embeddings,
        "asked_ratio": opts.ratio,
        "achieved_ratio": achieved,
    }
    return run_record(
        model,
        plan,
        criterion=criterion,
        calibration=calibration,
        before=before,
        seconds=seconds,
        source=source,
        parameters=parameters,
        width=asdict(opts),
        width_scores={k: [v.tolist() for v in per] for k, per in scores.items()},
        **extra,
    )
