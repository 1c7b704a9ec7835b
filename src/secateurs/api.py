"""The public Python API; the CLI is a thin layer over these functions.

model, tokenizer = load_model("smollm2-135m")
result = prune(model, tokenizer, criterion="ppl+", unit="block", remove=6, out="pruned/")
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.adapters import adapter_for
from secateurs.checkpoint import check_output_dir, write_json
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.data import CalibrationConfig
from secateurs.defaults import (
    DEFAULT_SHORTLIST,
    DEPTH_SHARE,
    HEAL_SAMPLES,
    SEARCH_OBJECTIVE,
    SUBBLOCK_SEARCH_OBJECTIVE,
)
from secateurs.depth_api import SUBBLOCK, explicit_plan, run_search, search_budget, search_record
from secateurs.errors import ConfigError
from secateurs.export import engines_for_model
from secateurs.healing import heal_calibration, heal_plan
from secateurs.objectives import objective
from secateurs.plan import (
    Plan,
    check_scores,
    count_to_remove,
    lowest_unprotected,
    parse_protected,
    resolve_protected,
)
from secateurs.prune_flow import PruneResult, finish, run_record
from secateurs.runinfo import calibration_tokens as _calibration
from secateurs.runinfo import count_parameters, versions
from secateurs.surgery import apply_plan
from secateurs.units import Unit, check_unit_kind
from secateurs.width_api import (
    WIDTH_UNITS,
    WidthOptions,
    parameter_base,
    parse_layers,
    prune_width,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CriterionSpec:
    """A criterion name as given ("ppl+"), split into the registered name and protection."""

    name: str
    protected: tuple[int, ...]

    @classmethod
    def parse(cls, text: str, protect: str | tuple[int, ...] | None = None) -> CriterionSpec:
        """``NAME+`` protects Shortened LLaMA's blocks; an explicit ``protect`` always wins."""
        plus = text.endswith("+")
        name = CRITERIA.canonical(text.rstrip("+"))
        if protect is None:
            protect = "sl" if plus else "none"
        return cls(name, parse_protected(protect))


@dataclass(frozen=True)
class ScoreResult:
    """Scores of one unit kind by one criterion, with what is needed to reproduce them."""

    criterion: str
    unit: str
    values: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    seconds: float = 0.0
    removed_before: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["values"] = list(self.values)
        data["removed_before"] = [list(u) for u in self.removed_before]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScoreResult:
        names = {f.name for f in fields(cls)}
        data = {key: value for key, value in data.items() if key in names}  # drop run metadata
        data["values"] = tuple(data["values"])
        data["removed_before"] = tuple(tuple(u) for u in data.get("removed_before", ()))
        return cls(**data)


def score_units(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    criterion: str = "ppl",
    unit: str = "block",
    *,
    calibration: CalibrationConfig | torch.Tensor | None = None,
    data_root: str | os.PathLike | None = None,
    removed: tuple[Unit, ...] = (),
    batch_size: int = 1,
    progress: bool = True,
    **options: Any,
) -> ScoreResult:
    """Score every layer's ``unit`` ("block", "attn", "mlp") with ``criterion``."""
    check_unit_kind(unit)
    name = CRITERIA.canonical(criterion.rstrip("+"))
    scorer = CRITERIA.get(name)(**options)
    if unit not in scorer.units:
        raise ConfigError(f"Criterion {name!r} cannot score {unit!r} units.")
    calib_tokens, calib_record = _calibration(
        scorer.needs_calibration, calibration, tokenizer, data_root
    )
    ctx = ScoringContext(
        model.eval(), adapter_for(model), calib_tokens, batch_size, removed, progress
    )
    start = time.perf_counter()
    values = scorer.score(ctx, unit).to(torch.float64)
    live = torch.tensor([i for i in range(len(values)) if Unit(i, unit) not in removed])
    check_scores(values[live], name)
    return ScoreResult(
        name,
        unit,
        tuple(values.tolist()),
        scorer.options(),
        calib_record,
        time.perf_counter() - start,
        tuple(tuple(u) for u in removed),
    )


def plan_from_scores(
    scores: ScoreResult, num_layers: int, count: int, protected: tuple[int, ...] = ()
) -> Plan:
    """Remove the ``count`` lowest-scoring units of ``scores.unit`` outside ``protected``."""
    protected = resolve_protected(protected, num_layers)
    if len(scores.values) != num_layers:
        raise ConfigError(
            f"Scores cover {len(scores.values)} layers but the model has {num_layers}."
        )
    chosen = lowest_unprotected(torch.tensor(scores.values), count, protected)
    return Plan.of_units(num_layers, [Unit(i, scores.unit) for i in chosen], protected)


def prune(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    *,
    criterion: str = "ppl+",
    unit: str = "block",
    ratio: float | None = None,
    remove: int | None = None,
    protect: str | tuple[int, ...] | None = None,
    iterative: bool = False,
    calibration: CalibrationConfig | None = None,
    data_root: str | os.PathLike | None = None,
    scores: ScoreResult | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    source: str | None = None,
    progress: bool = True,
    allocation: str = "uniform",
    layers: str | tuple[int, int] | None = None,
    min_ratio: float = 0.0,
    max_ratio: float = 0.9,
    round_to: int = 1,
    uniform_widths: bool = False,
    include_embeddings: bool = False,
    compensate: bool | None = None,
    reconstruct: bool | None = None,
    reconstruct_damping: float = 0.01,
    reconstruct_samples: int = 64,
    sensitivity: bool | None = None,
    blocks: str | tuple[int, ...] | None = None,
    attn: str | tuple[int, ...] | None = None,
    mlp: str | tuple[int, ...] | None = None,
    plan: str | os.PathLike | dict | None = None,
    params: int | None = None,
    shortlist: int | None = DEFAULT_SHORTLIST,
    heal: bool = False,
    heal_samples: int = HEAL_SAMPLES,
    heal_bias: bool = False,
    heal_target: str = "local",
    depth_share: float = DEPTH_SHARE,
    **options: Any,
) -> PruneResult:
    """Score, plan and remove units of ``model`` (in place); save to ``out`` if given.

    Depth (``unit`` "block", "attn", "mlp"): ``ratio`` is a fraction of the layers' units of
    kind ``unit``; ``remove`` a count; ``iterative`` re-scores after each removal.
    Width (``unit`` "heads", "channels", "width"): ``ratio`` is a fraction of the parameters
    (non-embedding unless ``include_embeddings``), spread by ``allocation`` ("uniform" or
    "global") over ``layers`` ("4:28"), within ``min_ratio``/``max_ratio`` per layer, channels
    rounded to ``round_to``; see ``secateurs.width_api.prune_width``.
    Depth extras: ``unit="subblock"`` ranks attention and MLP branches together under a
    parameter budget (``params``, or ``remove`` blocks' worth, or ``ratio`` of the layers'
    parameters); ``ppl`` with ``iterative`` or ``subblock`` runs the greedy search of
    ``secateurs.depth_search`` re-scoring a ``shortlist`` per step (None: all). ``blocks`` /
    ``attn`` / ``mlp`` ("12,13") or ``plan`` (a plan or secateurs.json file) remove exactly
    those units, no scoring. ``heal`` fits a least-squares correction (``secateurs.healing``).
    Depth and width together (``unit="block,width"``, or ``block,heads`` / ``block,channels``):
    ``ratio`` of the parameters as for width, ``depth_share`` of it taken by whole blocks and
    the rest by width; ``criterion`` "BLOCK,WIDTH" (or one name that scores both). See
    ``_prune_combined`` and docs/plans.md.
    """
    if unit == "experts":  # mixture-of-experts models: secateurs.experts_api
        run = dict(calibration=calibration, data_root=data_root, out=out, overwrite=overwrite)
        run.update(source=source, progress=progress, **options)
        return _prune_experts(model, tokenizer, criterion, (ratio, remove, allocation), run)
    combined = combined_units(unit)
    if unit in WIDTH_UNITS or combined:
        if remove is not None or iterative or scores is not None:
            raise ConfigError("Width pruning takes --ratio (of parameters) only.")
        if ratio is None:
            raise ConfigError("Width pruning needs a ratio: a fraction of the parameters.")
        opts = WidthOptions(
            combined[1] if combined else unit,
            ratio,
            allocation,
            parse_layers(layers),
            min_ratio,
            max_ratio,
            round_to,
            uniform_widths,
            include_embeddings,
            compensate,
            reconstruct,
            reconstruct_damping,
            reconstruct_samples,
            sensitivity,
        )
        if combined:
            run = dict(calibration=calibration, data_root=data_root, out=out, overwrite=overwrite)
            run.update(source=source, progress=progress, protect=protect)
            return _prune_combined(model, tokenizer, criterion, opts, depth_share, run, options)
        return prune_width(
            model,
            tokenizer,
            criterion=criterion,
            options=opts,
            calibration=calibration,
            data_root=data_root,
            out=out,
            overwrite=overwrite,
            source=source,
            progress=progress,
            **options,
        )
    if out is not None:
        check_output_dir(out, overwrite)  # before any costly work
    adapter = adapter_for(model)
    num_layers = adapter.num_layers(model)
    params_before = count_parameters(model)
    start, cpu_start = time.perf_counter(), time.process_time()
    given = explicit_plan(num_layers, blocks, attn, mlp, plan)
    if given is not None:
        if scores is not None or iterative or any(x is not None for x in (ratio, remove, params)):
            raise ConfigError(
                "An explicit selection (blocks/attn/mlp/plan) takes no ratio, remove, params, "
                "scores or iterative."
            )
        if given.compensate and given.has_widths:
            raise ConfigError(
                "This plan folds the removed widths' mean inputs into biases (compensate), "
                "which need the calibration of the run that made it: re-run that pruning, or "
                'set "compensate": false in the plan to cut the same units without it.'
            )
        chosen, history, search, spec = given, [], None, CriterionSpec("explicit", ())
    else:
        spec = CriterionSpec.parse(criterion, protect)
        chosen, history, search = _scored_plan(
            model,
            tokenizer,
            spec,
            unit,
            num_layers,
            dict(
                ratio=ratio,
                remove=remove,
                params=params,
                iterative=iterative,
                shortlist=shortlist,
                scores=scores,
                calibration=calibration,
                data_root=data_root,
                progress=progress,
                options=options,
            ),
        )
    scoring_seconds = time.perf_counter() - start
    scoring_cpu = time.process_time() - cpu_start
    healing = None
    if heal and chosen.parts != ("depth",):
        raise ConfigError("Healing corrects removed blocks and branches: a depth-only plan.")
    if heal:
        tokens = _calibration_tokens(
            heal_calibration(calibration, heal_samples), tokenizer, data_root
        )
        healing = heal_plan(model, adapter, chosen, tokens, bias=heal_bias, target=heal_target)
    apply_plan(model, chosen, adapter)
    record = depth_record(
        model, chosen, spec, history, iterative, params_before, scoring_seconds, source
    )
    record["search"], record["healing"] = search, healing
    record["engines"] = engines_for_model(model)  # per output kind, as saving records it
    record["timings"]["scoring_cpu_s"] = round(scoring_cpu, 3)  # robust to a busy machine
    return finish(model, tokenizer, chosen, record, scores=history, out=out, overwrite=overwrite)


def combined_units(unit: str) -> tuple[str, str] | None:
    """``"block,width"`` → ("block", "width") (either order; the width kind may be heads,
    channels or width); None for a single unit kind."""
    kinds = [part.strip() for part in unit.split(",") if part.strip()]
    if len(kinds) < 2:
        return None
    depth = [k for k in kinds if k == "block"]
    width = [k for k in kinds if k in WIDTH_UNITS]
    if len(kinds) != 2 or len(depth) != 1 or len(width) != 1:
        raise ConfigError(
            f"Combined units are a block and a width kind (block,width / block,heads / "
            f"block,channels), not {unit!r}."
        )
    return "block", width[0]


def _combined_criteria(criterion: str, options: dict[str, Any]) -> tuple[str, str]:
    """(block criterion, width criterion) from "BLOCK,WIDTH" or one name that scores both;
    checked before any work."""
    names = [part.strip() for part in criterion.split(",")]
    if len(names) == 1:
        names *= 2
    if len(names) != 2:
        raise ConfigError(f"--criterion takes BLOCK,WIDTH for combined units, not {criterion!r}.")
    for name, kind in zip(names, ("block", "heads"), strict=True):
        found = CRITERIA.get(CRITERIA.canonical(name.rstrip("+")))
        if kind not in found.units:
            raise ConfigError(
                f"Criterion {name!r} cannot score {kind} units: give --criterion BLOCK,WIDTH "
                "(e.g. block-influence,fluctuation)."
            )
    if names[0] != names[1] and set(options) - {"batch_size"}:
        raise ConfigError("Criterion options need one criterion for both kinds (not A,B).")
    return names[0], names[1]


def _prune_combined(model, tokenizer, criterion, opts, depth_share, run, options) -> PruneResult:
    """Blocks and width under ONE parameter budget: ``opts.ratio`` of the parameters (as width
    counts them), ``depth_share`` of it as whole blocks (the lowest-scoring, chosen first on
    the dense model), the rest as width scored and allocated on the block-pruned model. The
    plan is recorded in the original model's indices (``apply_plan`` reproduces the cut)."""
    block_criterion, width_criterion = _combined_criteria(criterion, options)
    if not 0 < depth_share < 1:
        raise ConfigError(f"depth_share must be in (0, 1); got {depth_share}.")
    if run["out"] is not None:
        check_output_dir(run["out"], run["overwrite"])
    adapter = adapter_for(model)
    n, before = adapter.num_layers(model), count_parameters(model)
    base = parameter_base(model, opts.include_embeddings)
    blocks = _budget_blocks(model, adapter, opts.ratio * base, depth_share)
    common = {k: run[k] for k in ("calibration", "data_root", "progress")}
    depth = prune(
        model, tokenizer, criterion=block_criterion, unit="block", remove=blocks,
        protect=run["protect"], **common, **options,
    )  # fmt: skip
    kept = depth.plan.kept_layers
    width_ratio = (opts.ratio * base - (before - count_parameters(model))) / parameter_base(
        model, opts.include_embeddings
    )
    layers = _kept_range(opts.layer_range(n), kept)
    width_opts = replace(opts, ratio=width_ratio, layers=layers)
    width = prune_width(
        model, tokenizer, criterion=width_criterion, options=width_opts, **common, **options
    )
    plan = depth.plan.merged(_lifted(width.plan, kept, n))
    record = _combined_record(model, plan, depth, width, (before, base, opts, depth_share), run)
    return finish(
        model, tokenizer, plan, record, scores=depth.scores, out=run["out"],
        overwrite=run["overwrite"],
    )  # fmt: skip


def _budget_blocks(model, adapter, budget: float, share: float) -> int:
    """Blocks whose parameters make ``share`` of ``budget`` (blocks of average size)."""
    sizes = [count_parameters(layer) for layer in adapter.layers(model)]
    mean = sum(sizes) / len(sizes)
    count = round(share * budget / mean)
    if count < 1:
        raise ConfigError(
            f"A depth share of {share} of the budget is less than half a block; raise the "
            "ratio or the depth share (or prune width alone)."
        )
    if count * mean >= budget:
        raise ConfigError(
            f"{count} blocks take the whole budget, leaving nothing for width; lower the depth "
            "share (or prune blocks alone)."
        )
    return count


def _kept_range(allowed: list[int], kept: tuple[int, ...]) -> tuple[int, int]:
    """The width layer range (original indices) in the block-pruned model's indices: the kept
    layers inside it are contiguous there."""
    inside = [new for new, old in enumerate(kept) if old in allowed]
    if not inside:
        raise ConfigError("Every layer of --layers is removed as a block; nothing to narrow.")
    return inside[0], inside[-1] + 1


def _lifted(width: Plan, kept: tuple[int, ...], num_layers: int) -> Plan:
    """A width plan of the block-pruned model in the original model's layer indices."""

    def spread(values: tuple, empty: Any) -> tuple:
        out = [empty] * num_layers
        for new, old in enumerate(kept):
            out[old] = values[new]
        return tuple(out)

    return Plan.of_widths(
        num_layers,
        spread(width.heads, ()),
        spread(width.channels, ()),
        spread(width.num_heads, 0),
        spread(width.num_channels, 0),
        width.compensate,
    )


def _combined_record(model, plan, depth, width, amounts, run) -> dict[str, Any]:
    before, base, opts, share = amounts
    middle = depth.record["parameters"]["after"]
    after = count_parameters(model)
    kept = plan.kept_layers
    width_scores = {
        kind: list(_lifted_list(per_layer, kept, plan.num_layers))
        for kind, per_layer in width.record["width_scores"].items()
    }
    parameters = {
        "base": base,
        "base_excludes_embeddings": not opts.include_embeddings,
        "asked_ratio": opts.ratio,
        "achieved_ratio": (before - after) / base,
        "depth_share": share,
        "removed_by_depth": before - middle,
        "removed_by_width": middle - after,
    }
    criterion = {
        "name": f"{depth.record['criterion']['name']},{width.record['criterion']['name']}",
        "block": depth.record["criterion"],
        "width": width.record["criterion"],
    }
    return run_record(
        model,
        plan,
        criterion=criterion,
        calibration=width.record["calibration"] or depth.record["calibration"],
        before=before,
        seconds=depth.record["timings"]["scoring_s"] + width.record["timings"]["scoring_s"],
        source=run["source"],
        parameters=parameters,
        scores=depth.record["scores"],
        width={**width.record["width"], "layers": opts.layers},
        width_scores=width_scores,
        reconstruction=width.record["reconstruction"],
        layer_sensitivity=width.record["layer_sensitivity"],
        engines=engines_for_model(model),
    )


def _lifted_list(per_layer: list, kept: tuple[int, ...], num_layers: int) -> list:
    out: list = [[] for _ in range(num_layers)]
    for new, old in enumerate(kept):
        out[old] = per_layer[new]
    return out


def stream_prune(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    blocks: str | tuple[int, ...] | None = None,
    plan: str | os.PathLike | dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Remove the named ``blocks`` (or a ``plan`` of blocks) from a local safetensors
    checkpoint without loading its weights: tensors are copied a row block at a time, so
    memory stays far below the model's size (``benchmarks/scale.py``). The output is what
    ``prune`` with the same explicit selection saves, byte for byte."""
    from secateurs.streaming import meta_skeleton, stream_depth_prune

    check_output_dir(out, overwrite)  # before reading anything
    skeleton = meta_skeleton(source)  # config only: every tensor on the meta device
    adapter = adapter_for(skeleton)
    chosen = explicit_plan(adapter.num_layers(skeleton), blocks, None, None, plan)
    if chosen is None:
        raise ConfigError("Streaming removes the blocks you name: give --blocks or --plan.")
    before = count_parameters(skeleton)
    apply_plan(skeleton, chosen, adapter)
    spec = CriterionSpec("explicit", ())
    record = depth_record(skeleton, chosen, spec, [], False, before, 0.0, str(source))
    record["streamed"] = True
    start = time.perf_counter()
    stream_depth_prune(source, chosen, out, record, overwrite=overwrite)
    log.info("Streamed surgery took %.1f s", time.perf_counter() - start)
    return Path(out)


def _calibration_tokens(calibration, tokenizer, data_root) -> torch.Tensor:
    tokens, _ = _calibration(True, calibration, tokenizer, data_root)
    return tokens


def _scored_plan(model, tokenizer, spec, unit, num_layers, how):
    """(plan, score history, search record) for a scored depth selection."""
    protected = resolve_protected(spec.protected, num_layers)
    if unit == SUBBLOCK or (how["iterative"] and spec.name == "ppl"):
        return _searched_plan(model, tokenizer, spec, unit, num_layers, protected, how)
    if how["params"] is not None:
        raise ConfigError("--params applies to --unit subblock; use --remove or --ratio.")
    count = _checked_count(unit, num_layers, protected, how["ratio"], how["remove"])
    score_kwargs = dict(
        calibration=how["calibration"],
        data_root=how["data_root"],
        progress=how["progress"],
        **how["options"],
    )
    if how["iterative"]:
        plan, history = _iterative_plan(
            model, tokenizer, spec.name, unit, count, protected, score_kwargs
        )
        return plan, history, None
    history = [how["scores"] or score_units(model, tokenizer, spec.name, unit, **score_kwargs)]
    _check_reused(history[0], spec.name, unit)
    return plan_from_scores(history[0], num_layers, count, protected), history, None


def _checked_count(unit, num_layers, protected, ratio, remove) -> int:
    count = count_to_remove(num_layers, ratio=ratio, remove=remove)
    removable = num_layers - len(protected)
    if unit == "block":
        removable = min(removable, num_layers - 1)  # one block must remain
    if count > removable:
        raise ConfigError(
            f"Asked to remove {count} {unit} units but only {removable} of {num_layers} are "
            f"removable (protected: {list(protected)}; at least one block must remain)."
        )
    return count


def _searched_plan(model, tokenizer, spec, unit, num_layers, protected, how):
    if spec.name != "ppl":
        raise ConfigError(
            f"The greedy search ({unit}) scores by calibration PPL; criterion {spec.name!r} "
            "cannot drive it (use ppl or ppl+)."
        )
    if how["scores"] is not None:
        raise ConfigError("Saved scores cannot drive a greedy search; drop --scores.")
    adapter = adapter_for(model)
    budget, by = search_budget(
        model, adapter, unit, ratio=how["ratio"], remove=how["remove"], params=how["params"]
    )
    if by == "units":
        budget = _checked_count(unit, num_layers, protected, how["ratio"], how["remove"])
    tokens, calib_record = _calibration(True, how["calibration"], tokenizer, how["data_root"])
    options = dict(how["options"])
    batch_size = int(options.pop("batch_size", 8))
    unknown = sorted(set(options) - {"objective", "top_k"})
    if unknown:
        raise ConfigError(
            "The greedy search takes --option batch_size, objective (nll, kl) and top_k; got "
            f"{unknown}."
        )
    default = SUBBLOCK_SEARCH_OBJECTIVE if unit == SUBBLOCK else SEARCH_OBJECTIVE
    goal = objective(str(options.pop("objective", default)), **options)
    start = time.perf_counter()
    units, state = run_search(
        model.eval(),
        adapter,
        tokens,
        unit,
        protected,
        budget,
        by,
        how["shortlist"],
        batch_size,
        how["progress"],
        goal,
    )
    seconds = time.perf_counter() - start
    search = search_record(state, unit, num_layers, how["shortlist"])
    search["budget"] = {"value": budget, "counts": by}
    history = [
        ScoreResult(
            spec.name,
            kind,
            tuple(values),
            {"search": True, "batch_size": batch_size, **goal.options()},
            calib_record,
            seconds,
        )
        for kind, values in search["first_step_scores"].items()
    ]
    return Plan.of_units(num_layers, units, protected), history, search


def _prune_experts(model, tokenizer, criterion, amount: tuple, run: dict) -> PruneResult:
    """``unit="experts"``: see ``secateurs.experts_api.prune_experts``."""
    from secateurs.experts_api import ExpertOptions, prune_experts

    options = ExpertOptions(*amount)
    return prune_experts(model, tokenizer, criterion=criterion, options=options, **run)


def _check_reused(scores: ScoreResult, name: str, unit: str) -> None:
    if (scores.criterion, scores.unit) != (name, unit):
        raise ConfigError(
            f"Saved scores are for {scores.criterion}/{scores.unit}, not {name}/{unit}."
        )


def _iterative_plan(model, tokenizer, name, unit, count, protected, score_kwargs):
    removed: list[Unit] = []
    history = []
    calibration = score_kwargs.pop("calibration")
    if CRITERIA.get(name).needs_calibration and not isinstance(calibration, torch.Tensor):
        calibration = (calibration or CalibrationConfig()).load(
            tokenizer, score_kwargs.get("data_root")
        )
    for _ in range(count):
        result = score_units(
            model,
            tokenizer,
            name,
            unit,
            calibration=calibration,
            removed=tuple(removed),
            **score_kwargs,
        )
        excluded = set(protected) | {u.layer for u in removed}
        (choice,) = lowest_unprotected(torch.tensor(result.values), 1, excluded)
        removed.append(Unit(choice, unit))
        history.append(result)
        log.info("iterative: removed %s %d (step %d/%d)", unit, choice, len(removed), count)
    num_layers = adapter_for(model).num_layers(model)
    return Plan.of_units(num_layers, removed, protected), history


def depth_record(
    model: PreTrainedModel,
    plan: Plan,
    spec: CriterionSpec,
    history: list[ScoreResult],
    iterative: bool,
    before: int,
    seconds: float,
    source: str | None,
) -> dict[str, Any]:
    """The run record (``prune_flow.run_record``) of a depth pruning or an explicit plan."""
    first = history[0] if history else None
    criterion = {
        "name": spec.name,
        "protected": list(plan.protected),
        "iterative": iterative,
        "options": first.options if first else {},
    }
    return run_record(
        model,
        plan,
        criterion=criterion,
        calibration=first.calibration if first else None,
        before=before,
        seconds=seconds,
        source=source,
        scores=[s.to_dict() for s in history],
    )


def save_scores(scores: ScoreResult, path: str | os.PathLike, extra: dict | None = None) -> None:
    write_json(Path(path), {**scores.to_dict(), **(extra or {}), "versions": versions()})
