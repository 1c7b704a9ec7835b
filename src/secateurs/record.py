"""The ONE ``secateurs.json`` builder: every run, whatever it removes and wherever its weights
lived, records the same top-level keys (plus the evidence its strategy has: ``scores``,
``search``, ``width_scores``, ``expert_scores``, ...), the resolved spec and the command that
reproduces it, and every phase's time."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from typing import Any

from secateurs import __version__
from secateurs.runinfo import count_parameters, peak_rss_mb, versions
from secateurs.spec import PruneSpec


def build_record(
    spec: PruneSpec,
    session: Any,
    choice: Any,
    cut: Any,
    counts: tuple[int, int],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The record of a run whose model (``session.model``) is already cut; ``counts``: the
    parameters before and the base a ratio refers to."""
    before, base = counts
    after = count_parameters(session.model)
    plan = choice.plan
    record: dict[str, Any] = {
        "secateurs_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_model": session.source,
        "model_type": session.config.model_type,
        "units": list(plan.parts),
        "plan": plan.to_dict(),
        "criterion": choice.criterion,
        "calibration": choice.calibration,
        "parameters": parameters(spec, before, after, base, choice.extra.pop("parameters", {})),
        "timings": {k: round(v, 3) for k, v in timings.items()} | {"peak_rss_mb": peak_rss_mb()},
        "versions": versions(),
        "spec": spec.to_dict(),
        "command": command(spec, session.source),
        "session": session.record(),
        "scores": [s.to_dict() for s in choice.scores],
        **choice.extra,
        "reconstruction": cut.reconstruction,
        "healing": cut.healing,
    }
    record["timings"]["peak_rss_mb"] = round(record["timings"]["peak_rss_mb"], 1)
    return record


def parameters(spec: PruneSpec, before: int, after: int, base: int, more: dict) -> dict:
    budget = spec.budget
    if "removed_by_depth" in more:
        more = {**more, "removed_by_width": before - after - more["removed_by_depth"]}
    return {
        "before": before,
        "after": after,
        "base": base,
        "base_excludes_embeddings": not budget.include_embeddings,
        "asked_ratio": budget.ratio,
        "asked_remove": budget.remove,
        "asked_params": budget.params,
        "achieved_ratio": (before - after) / base if base else None,
        **more,
    }


def command(spec: PruneSpec, source: str | None, out: str = "OUT") -> str:
    """The ``secateurs prune`` command that reproduces this run (from the resolved spec)."""
    words = ["secateurs", "prune", source or "MODEL"]
    for key, value in spec.to_options().items():
        if key == "options":
            words += [w for k, v in value.items() for w in ("--option", f"{k}={v}")]
            continue
        if key == "mode":
            words.append("--in-memory" if value == "memory" else f"--{value}")
            continue
        if key == "layers":
            value = f"{value[0]}:{value[1]}"
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif value is not False:
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            words += [flag, text]
    return shlex.join([*words, "--out", out])
