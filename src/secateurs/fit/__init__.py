"""Cutting a plan out of a session's model, layer by layer, with its closed-form repairs.

One pass over the layers does everything, in memory or from disk: each layer is loaded once,
fitted where the spec asks (``heal``: a removed run's correction into the layer before it;
``reconstruct``: the kept output-projection columns re-solved), cut (``units.Cut``), and — where
a later fit needs them — run on the fit windows to give the next layer the already-repaired
model's activations. A layer with nothing to do is not loaded at all (from disk, it is copied
as it is). The fits use their own windows (``heal_samples`` / ``reconstruct_samples``), not the
scoring ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from secateurs.calibration import Windows
from secateurs.fit.heal import Healing
from secateurs.fit.reconstruct import Reconstruction
from secateurs.plan import Plan
from secateurs.session.base import Session
from secateurs.session.flow import Flow
from secateurs.spec import PruneSpec
from secateurs.units import Cut, Means

log = logging.getLogger(__name__)


@dataclass
class CutReport:
    """What the cut did, for ``secateurs.json``."""

    plain_config: bool = True
    reconstruction: dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    healing: dict[str, Any] | None = None
    seconds: float = 0.0


def cut(session: Session, plan: Plan, spec: PruneSpec, windows: Windows, means: Means) -> CutReport:
    """Cut ``plan`` out of ``session``'s model with the fits ``spec`` asks for (in place)."""
    start = time.perf_counter()
    report = CutReport()
    cutter = Cut(session.model, plan, session.adapter, means)
    fits = _fits(session, plan, spec, windows)
    last = max((f.last_layer for f in fits.values()), default=-1)
    if fits:
        flow = windows.flow(_fit_samples(spec, fits))
        _walk(flow, cutter, fits, last, _dense_after(flow, fits))
    for index in range(last + 1, plan.num_layers):
        if cutter.touches(index):
            with session.loaded(index):
                cutter.layer(index)
                session.changed(index)
    report.plain_config = cutter.finish()
    _finish_reports(report, fits, windows, spec)
    report.seconds = time.perf_counter() - start
    return report


def _fits(session: Session, plan: Plan, spec: PruneSpec, windows: Windows) -> dict[str, Any]:
    fits: dict[str, Any] = {}
    model, adapter = session.model, session.adapter
    if (spec.fit.heal or spec.joint) and plan.has_depth:  # auto's removals are always healed
        fit = spec.fit
        fits["heal"] = Healing(
            model,
            adapter,
            plan,
            damp=fit.heal_damping,
            bias=fit.heal_bias,
            target=fit.heal_target,
            objective=fit.heal_objective,
        )
    if plan.has_widths and spec.fit.reconstructing and not plan.compensate:
        if windows.available:
            tokens = windows.tokens(max(spec.data.n_samples, spec.fit.reconstruct_samples))
            intercept = spec.fit.compensate is not False
            fits["reconstruct"] = Reconstruction(
                model, adapter, plan, spec.fit.reconstruct_damping, intercept, tokens.numel()
            )
        else:
            log.warning("no calibration windows (no tokenizer): the width cut is not reconstructed")
    return fits


def _fit_samples(spec: PruneSpec, fits: dict[str, Any]) -> int:
    if "heal" in fits:
        return spec.fit.heal_samples
    return max(spec.data.n_samples, spec.fit.reconstruct_samples)


def _walk(flow: Flow, cutter: Cut, fits: dict[str, Any], last: int, dense: dict) -> None:
    """Layers 0..``last``: fit, cut, and run each on the fit windows as the pruned model."""
    heal, rebuild = fits.get("heal"), fits.get("reconstruct")
    flow.set_base([u for u in cutter.plan.units if u.kind == "block"])
    session = flow.session
    for step in flow.walk(stop=last + 1, desc="cut and fit"):
        changed = cutter.touches(step.index)
        if rebuild is not None:
            rebuild.layer(step)  # cuts the widths it re-fits
        widths = () if rebuild is not None else ("heads", "channels")
        cutter.layer(step.index, widths=widths, branches=("attn",))
        if heal is not None and heal.heals_into(step.index):  # may need this layer's MLP
            changed = heal.layer(step, dense.get(step.index)) or changed
        cutter.layer(step.index, widths=(), branches=("mlp",))
        if changed:
            session.changed(step.index)


def _dense_after(flow: Flow, fits: dict[str, Any]) -> dict[int, list]:
    """For healing towards the dense model: the dense model's stream after each run, by the
    layer the run heals into (one pass of the flow with nothing removed)."""
    heal = fits.get("heal")
    if heal is None or not heal.needs_dense_stream:
        return {}
    into = {run.removed[-1][0]: layer for layer, run in heal.runs.items()}
    found: dict[int, list] = {}
    flow.set_base(())
    for step in flow.walk(stop=max(into) + 1, desc="dense stream"):
        output = step.advance()
        if step.index in into:
            found[into[step.index]] = output
    return found


def _finish_reports(report: CutReport, fits: dict[str, Any], windows: Windows, spec) -> None:
    if "reconstruct" in fits:
        samples = max(spec.data.n_samples, spec.fit.reconstruct_samples)
        report.reconstruction = {"samples": samples, **fits["reconstruct"].finish()}
        if windows.given is not None:
            report.reconstruction["samples"] = len(windows.given)
    if "heal" in fits:
        samples = len(windows.given) if windows.given is not None else spec.fit.heal_samples
        report.healing = fits["heal"].finish(samples)
