"""Training-free healing after block removal, absorbed into a standard checkpoint.

For each run of consecutive removed blocks a..b, the kept block p = a-1 before it has an MLP
output projection (down_proj) whose output adds straight into the residual stream. On
calibration windows we record that projection's inputs X (tokens, m) and the removed blocks'
contribution D = h_out(b) - h_in(a) (tokens, d), and fit the damped least-squares correction

    ΔW = argmin ||D - X ΔWᵀ||² + λ||ΔW||²,   λ = damp · mean(diag(XᵀX)),

then add ΔW to down_proj's weight. The checkpoint keeps its shapes and config, so any engine
loads it. Runs are healed in order, each fitted with the earlier ones already removed and healed.
Because ΔW = 0 is a candidate, the fitted correction never increases the calibration
reconstruction error ||D - X ΔWᵀ||².
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.data import CalibrationConfig
from secateurs.defaults import HEAL_SAMPLES, HEAL_TARGETS
from secateurs.errors import ConfigError
from secateurs.layerwise import Stop
from secateurs.plan import Plan
from secateurs.units import Unit, first_arg, masked
from secateurs.width import add_output_bias, bias_flag_supported

log = logging.getLogger(__name__)

DAMP = 0.01


def heal_calibration(
    calibration: CalibrationConfig | torch.Tensor | None, samples: int = HEAL_SAMPLES
) -> Any:
    """Healing's calibration: the scoring one's source and seed, with ``samples`` windows."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    return replace(calibration or CalibrationConfig(), n_samples=samples)


def runs_of(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive layer indices."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(blocks):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def fit_correction(gram: torch.Tensor, cross: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """ΔW (d, m) minimising ||D − X ΔWᵀ||² + λ||ΔW||² from XᵀX (m, m) and XᵀD (m, d)."""
    lam = damp * float(gram.diagonal().mean()) if damp > 0 else 0.0
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.lstsq(system, cross).solution.T  # lstsq: safe when X is rank-deficient


def output_projection(model: PreTrainedModel, adapter: Adapter, layer: int) -> nn.Module | None:
    """The MLP output projection of ``layer``, or None where the adapter does not know it."""
    if adapter.channels is None:
        return None
    return adapter.layers(model)[layer].get_submodule(adapter.channels.output)


@torch.no_grad()
def span_statistics(
    model: PreTrainedModel,
    adapter: Adapter,
    tokens: torch.Tensor,
    gone: list[Unit],
    run: tuple[int, int],
    batch_size: int = 8,
    intercept: bool = False,
    target: str = "local",
) -> dict[str, torch.Tensor]:
    """XᵀX, XᵀD, DᵀD (float64) for a run of removed blocks, with ``gone`` masked.

    ``intercept`` appends a column of ones to X (its coefficient becomes a bias). ``target``:
    "local" D is the run's own contribution on the pruned stream; "dense" D is the dense
    model's stream after the run minus the pruned stream before it (it also corrects the drift
    left by earlier removals).
    """
    first, last = run
    layers = adapter.layers(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        output_projection(model, adapter, first - 1).register_forward_pre_hook(
            lambda m, args: seen.__setitem__("x", args[0])
        ),
        layers[first].register_forward_pre_hook(
            lambda m, args, kwargs: seen.__setitem__("h_in", first_arg(args, kwargs)),
            with_kwargs=True,
        ),
        layers[last].register_forward_hook(
            lambda m, args, out: seen.__setitem__(
                "h_out", out[0] if isinstance(out, tuple) else out
            )
        ),
    ]
    stats: dict[str, torch.Tensor] = {}
    try:
        for begin in range(0, len(tokens), batch_size):
            ids = tokens[begin : begin + batch_size]
            if target == "dense":
                _forward_until_stop(model, ids)
                reference = seen["h_out"]
            with masked(model, adapter, gone):
                _forward_until_stop(model, ids)
            if target != "dense":
                reference = seen["h_out"]
            x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
            if intercept:
                x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
            d = (reference - seen["h_in"]).reshape(x.shape[0], -1).double()
            for key, value in (("gram", x.T @ x), ("cross", x.T @ d), ("energy", (d * d).sum())):
                stats[key] = stats[key] + value if key in stats else value
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def _forward_until_stop(model: PreTrainedModel, ids: torch.Tensor) -> None:
    with suppress(Stop):  # nothing after the run's last block is needed
        model(input_ids=ids, use_cache=False)


def _stop_with(seen: dict[str, torch.Tensor], output: Any) -> None:
    seen["h_out"] = output[0] if isinstance(output, tuple) else output
    raise Stop


def residual_energy(stats: dict[str, torch.Tensor], delta: torch.Tensor) -> float:
    """||D − X ΔWᵀ||² from the statistics: DᵀD − 2⟨ΔW, (XᵀD)ᵀ⟩ + ⟨ΔW, ΔW XᵀX⟩."""
    return float(
        stats["energy"]
        - 2 * (delta * stats["cross"].T).sum()
        + (delta @ stats["gram"] * delta).sum()
    )


@torch.no_grad()
def heal_plan(
    model: PreTrainedModel,
    adapter: Adapter,
    plan: Plan,
    tokens: torch.Tensor,
    damp: float = DAMP,
    bias: bool = False,
    target: str = "local",
) -> dict[str, Any]:
    """Fit and add the correction of every run of removed blocks (before surgery; in place).

    ``bias``: also fit an intercept, added to down_proj's bias; where the projection has none,
    the config's bias flag (LLaMA ``mlp_bias``) is turned on with zero biases elsewhere, and
    where the config has no such flag the intercept is not fitted (recorded).
    """
    if target not in HEAL_TARGETS:
        raise ConfigError(f"Healing target must be one of {HEAL_TARGETS}; got {target!r}.")
    bias = bias and _bias_available(model, adapter)
    report: dict[str, Any] = {
        "method": "least-squares down_proj" + (" + bias" if bias else ""),
        "damp": damp,
        "target": target,
        "samples": len(tokens),
        "runs": [],
    }
    branches = [u for u in plan.units if u.kind != "block"]
    done: list[Unit] = []
    for run in runs_of(plan.blocks):
        entry = _heal_run(
            model, adapter, plan, tokens, [*branches, *done], run, (damp, bias, target)
        )
        report["runs"].append(entry)
        done.extend(Unit(i, "block") for i in range(run[0], run[1] + 1))
    return report


def _bias_available(model: PreTrainedModel, adapter: Adapter) -> bool:
    if adapter.channels is None or adapter.channels.conv1d:
        return False
    if output_projection(model, adapter, 0).bias is not None:
        return True
    if not bias_flag_supported(model.config, adapter.channels.bias_flag):
        log.info(
            "healing: %s cannot express a down_proj bias; weights only", model.config.model_type
        )
        return False
    add_output_bias(model, adapter, "channels")
    return True


def _heal_run(model, adapter, plan, tokens, gone, run, how) -> dict[str, Any]:
    damp, bias, target = how
    first, last = run
    entry: dict[str, Any] = {"blocks": [first, last], "into_layer": first - 1}
    projection = output_projection(model, adapter, first - 1) if first > 0 else None
    if projection is None or first - 1 in plan.mlp or adapter.channels.conv1d:
        entry["skipped"] = "no kept MLP output projection before the run"
        log.info("healing: run %s skipped (%s)", run, entry["skipped"])
        return entry
    stats = span_statistics(model, adapter, tokens, gone, run, intercept=bias, target=target)
    delta = fit_correction(stats["gram"], stats["cross"], damp)
    entry["error_before"] = float(stats["energy"])
    entry["error_after"] = residual_energy(stats, delta)
    if bias:
        projection.bias += delta[:, -1].to(projection.bias.dtype)
        delta = delta[:, :-1]
    projection.weight += delta.to(projection.weight.dtype)
    log.info(
        "healing: blocks %d-%d into layer %d: error %.4g -> %.4g",
        first,
        last,
        first - 1,
        entry["error_before"],
        entry["error_after"],
    )
    return entry
