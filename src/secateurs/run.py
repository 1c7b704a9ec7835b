"""The one orchestrator: ``prune(source, spec, out)``.

    session → choose (score + allocate, or search, or an explicit plan) → cut with its fits
            → record → write

Every unit kind, every mix of kinds and every mode goes through these same steps; what differs
is a unit kind (``units``), a criterion (``criteria``), a strategy (``choose``), a fit
(``fit``) or a session (``session``), never a parallel path.

    from secateurs import prune
    result = prune("smollm2-135m", unit="block", criterion="ppl+", remove=6, out="runs/d6")
    result = prune(model, tokenizer=tokenizer, unit="width", ratio=0.2, allocation="global")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel

from secateurs.calibration import Windows
from secateurs.choose import Choice, choose, context, decoder_parameters, scored, scorer_for
from secateurs.errors import ConfigError
from secateurs.fit import cut
from secateurs.outputs import check_output_dir, release
from secateurs.plan import Plan
from secateurs.record import build_record
from secateurs.runinfo import count_parameters
from secateurs.scores import ScoreResult
from secateurs.sources import open_session
from secateurs.spec import PruneSpec
from secateurs.writer import write_checkpoint

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    """The pruned model (None when it was read from disk one layer at a time), its plan, the
    scores that chose it, its record and where it was saved."""

    model: PreTrainedModel | None
    plan: Plan
    scores: list[ScoreResult]
    record: dict[str, Any]
    out: Path | None = None


def as_spec(spec: PruneSpec | None, options: dict[str, Any]) -> PruneSpec:
    """``spec`` itself, or one built from flat options (``unit="width", ratio=0.2``)."""
    if spec is not None and not isinstance(spec, PruneSpec):
        raise ConfigError(
            f"prune(source, spec, ...): the second argument must be a PruneSpec, got "
            f"{type(spec).__name__}; pass a tokenizer as tokenizer=..."
        )
    if spec is not None and options:
        return spec.replaced(**options)
    return spec if spec is not None else PruneSpec.from_options(**options)


def prune(
    source: Any,
    spec: PruneSpec | None = None,
    *,
    tokenizer: Any = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    argv: str | None = None,
    **options: Any,
) -> PruneResult:
    """Prune ``source`` (a model object, a directory, a GGUF file, an alias or a hub id) as
    ``spec`` (or the flat ``options`` of ``PruneSpec.from_options``) says; save to ``out``.

    A model object is pruned in place. Every option is checked before any work, and against
    the model's config before its weights are read. ``argv``: the command line to record."""
    spec = as_spec(spec, options)
    if out is not None:
        check_output_dir(out, overwrite)
    try:
        clock = Clock()
        with clock("load"):
            session = open_session(source, spec, tokenizer, _spill_dir(out))
        try:
            return _run(session, spec, (out, overwrite, argv), progress, clock)
        finally:
            session.close()
    except BaseException:
        if out is not None:
            release(out)  # a failed run leaves ``out`` free for the next one, now
        raise


def _run(session, spec: PruneSpec, output: tuple, progress: bool, clock) -> PruneResult:
    out, overwrite, argv = output
    windows = Windows(spec.data, session, progress, spec.mode.offload_dir)
    base = decoder_parameters(session, spec.budget.include_embeddings)
    before = count_parameters(session.model)
    with clock("scoring"):
        choice = choose(session, spec, windows)
    if choice.plan.is_empty:  # e.g. widths rounded up to whole multiples: nothing to save
        raise ConfigError(
            "The budget removes nothing from this model (every layer stays whole, e.g. its "
            "widths rounded to --round-to / --target multiples); raise the budget or lower "
            "--round-to."
        )
    with clock("cut"):
        report = cut(session, choice.plan, spec, windows, choice.means)
    record = build_record(spec, session, choice, report, (before, base), clock.phases())
    record["parameters"]["plain_config"] = report.plain_config
    record["argv"] = argv
    _log_result(choice, record)
    if out is not None:  # the writer adds the write's time to the record's timings
        record = write_checkpoint(session, out, record, choice.plan.kept_layers, overwrite)
    model = session.model if session.kind == "memory" else None
    return PruneResult(model, choice.plan, choice.scores, record, Path(out) if out else None)


def _log_result(choice: Choice, record: dict[str, Any]) -> None:
    params = record["parameters"]
    log.info(
        "removed %d parameters (%.4f of the %d counted); chosen in %.1f s",
        params["before"] - params["after"],
        params["achieved_ratio"] or 0.0,
        params["base"],
        choice.seconds,
    )


def _spill_dir(out: Any) -> Path | None:
    """Where a lazy session spills changed layers: a hidden folder beside ``out``."""
    if out is None:
        return None
    target = Path(out).resolve()
    return target.with_name(f".{target.name}.layers-{os.getpid()}")


def score(
    source: Any, spec: PruneSpec | None = None, *, tokenizer: Any = None, **options: Any
) -> ScoreResult:
    """Score every layer's unit of ``spec``'s (one) depth kind, without pruning."""
    spec = as_spec(spec, {"remove": 1, **options} if spec is None else options)
    if len(spec.units) != 1 or spec.width_kinds or spec.experts:
        raise ConfigError("secateurs score scores one depth unit kind: --unit block|attn|mlp.")
    session = open_session(source, spec, tokenizer, scores_only=True)
    try:
        windows = Windows(spec.data, session, True)
        scorer = scorer_for(spec, spec.units[0])
        return scored(scorer, spec.units[0], context(session, scorer, windows), windows)
    finally:
        session.close()


class Clock:
    """Wall-clock seconds of each phase of a run (and the CPU seconds of all of them)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu = time.process_time()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def phases(self) -> dict[str, float]:
        wall = {f"{phase}_s": value for phase, value in self.seconds.items()}
        return {**wall, "cpu_s": time.process_time() - self.cpu}


__all__ = ["Clock", "PruneResult", "as_spec", "prune", "score"]
