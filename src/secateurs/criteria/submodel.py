"""``submodel`` (alias ``forward``): forward-only importance, the re-fit error of each unit in
its layer, put in loss units by measuring compensated sub-models. No ``backward()``.

**Unit scores (closed form, per layer).** For a layer's output projection W (out × in;
o_proj / down_proj) on inputs z = [x, 1] (the constant where reconstruction fits an intercept),
A = E[z zᵀ] over the calibration tokens, damped as influence damps it (A_λ = A + λ·mean(diag
A_x)·I on the x block). Removing group g (its input columns c) and re-fitting the rest by
least squares — what width reconstruction does afterwards — leaves the output error

    e_g = tr( W_c · [(A_λ⁻¹)_cc]⁻¹ · W_cᵀ )          (Optimal Brain Surgeon, per token)

(= ‖W_j‖² / (A_λ⁻¹)_jj for a channel): ``influence``'s second-order term with the output
curvature S replaced by the identity, so no gradient is needed. It equals min over the kept
columns' re-fit of ‖Z_k Ŵ_kᵀ − Z Ŵᵀ‖²/n + λ'(‖Ŵ_k − W_k‖² + ‖W_c‖²), checked by the tests.

**Loss units (forward passes).** e_g is a squared error of one layer's output; how much loss a
unit of it costs differs by layer. For each layer ℓ, held-out calibration windows (``windows``,
the first ones; default about 30%: A and e come from the others) are run through the
*sub-model* that removes the layer's ``fraction`` lowest-e groups with the closed-form
compensation ΔŴ = −W_R [(A_λ⁻¹)_RR]⁻¹ (A_λ⁻¹)_R,: , from ℓ's input to the loss, and

    c_ℓ = (L(sub-model ℓ) − L(model)) / Σ_{g ∈ R} e_g,        score_g = c_ℓ · e_g

Holding out matters: with fewer fit tokens than inputs (10 windows of 128 tokens for 1,536
MLP channels) the re-fit reproduces the fit windows almost exactly, and a scale measured on
them calls whole MLPs free (SmolLM2-135M, ``global-27``: WikiText-2 PPL 2,324 in-sample).
Scores are predicted calibration-loss changes (``loss_scores``: global allocation ranks
them per parameter, no sensitivity probe). A sub-model is a partial forward: the streams of
``streams`` layers at a time advance in lockstep with the base stream through the one flow,
each layer loaded once per group of layers, in memory or from disk alike; only the current
layer's second moment is held, so the peak is that of an inference pass plus those streams.
The convergence of the ranking with the number of calibration windows is saved
(``submodel_convergence``: Spearman of the scores from the first n windows with all of them),
with each layer's scale and measured loss change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.defaults import RECONSTRUCT_DAMPING
from secateurs.errors import ConfigError
from secateurs.units.width import can_add_intercept, output_weight_columns


@dataclass
class LayerMeasure:
    """One layer's unit errors (groups,), the calibration sub-model's removed groups and the
    per-window losses of that sub-model (windows,)."""

    errors: torch.Tensor
    removed: torch.Tensor
    losses: torch.Tensor | None = None


@CRITERIA.register("submodel", aliases=("forward",))
class SubModel(Criterion):
    name = "submodel"
    units = frozenset({"heads", "channels"})
    loss_scores = True  # c_ℓ · e_g: measured calibration-loss units
    assumes_reconstruction = True
    summary = "re-fit error tr(W_c[(A⁻¹)_cc]⁻¹W_cᵀ) × per-layer loss scale from sub-models"

    def __init__(
        self,
        fraction: float = 0.25,
        damping: float = RECONSTRUCT_DAMPING,
        intercept: bool | None = None,
        streams: int = 32,
        calibrate: bool = True,
        windows: int = 0,
    ) -> None:
        if not 0 < fraction < 1:
            raise ConfigError(f"submodel: fraction must be in (0, 1), got {fraction}.")
        if not damping > 0:
            raise ConfigError(f"submodel: damping must be > 0, got {damping}.")
        if int(windows) < 0:
            raise ConfigError(f"submodel: windows must be ≥ 0, got {windows}.")
        if int(streams) < 1:
            raise ConfigError(f"submodel: streams must be ≥ 1, got {streams}.")
        self.fraction, self.damping = float(fraction), float(damping)
        self.intercept, self.at_once = intercept, int(streams)
        self.calibrate, self.windows = bool(calibrate), int(windows)

    def options(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "damping": self.damping,
            "intercept": self.intercept,
            "streams": self.at_once,
            "calibrate": self.calibrate,
            "windows": self.windows,
        }

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        if kind not in self.units:
            return super().score_width(ctx, kind)
        if ctx.flow is None:
            raise ConfigError("submodel needs calibration data.")
        intercept = self.intercept
        if intercept is None:
            intercept = can_add_intercept(ctx.model, ctx.adapter, kind)
        measured, base = measure(ctx, kind, self, bool(intercept))
        if not self.calibrate:  # the ablation: raw output errors, one unit for every layer
            return [torch.empty(0) if m is None else m.errors for m in measured]
        scales = layer_scales(measured, base)
        scores = [
            m.errors * s if m is not None else torch.empty(0, dtype=torch.float64)
            for m, s in zip(measured, scales, strict=True)
        ]
        record_details(ctx, kind, measured, base, scales)
        return scores


# --- the closed form ---------------------------------------------------------------------------
def damped_inverse(a: torch.Tensor, n_in: int, damping: float) -> torch.Tensor:
    """(A + λ·mean(diag A_x)·I_x)⁻¹; a trailing intercept row/column (len(a) > n_in) is free.
    ``a`` is damped in place (it is the layer's only copy: memory)."""
    a.diagonal()[:n_in] += damping * float(a.diagonal()[:n_in].mean().clamp_min(1e-30))
    return torch.linalg.inv(a)


def obs_errors(weight: torch.Tensor, columns: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """e_g = tr(W_c [(A⁻¹)_cc]⁻¹ W_cᵀ) per group; ``weight`` (out, in), ``columns`` (groups,
    members), ``a_inv`` the damped inverse (in or in+1 square)."""
    columns = columns.to(weight.device)
    if columns.shape[1] == 1:  # channels: [(A⁻¹)_jj]⁻¹ is a scalar
        cols = columns[:, 0]
        return weight[:, cols].pow(2).sum(0) / a_inv.diagonal()[cols]
    errors = []
    for cols in columns:
        w = weight[:, cols]
        errors.append((w @ torch.linalg.inv(a_inv[cols][:, cols]) * w).sum())
    return torch.stack(errors)


def compensation(weight: torch.Tensor, cols: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """ΔŴ = −W_R [(A⁻¹)_RR]⁻¹ (A⁻¹)_R,: , (out, len(a_inv)): zeroes the removed columns R and
    re-fits the others (and the intercept) by damped least squares."""
    inv_rr = a_inv[cols][:, cols]
    return -weight[:, cols] @ torch.linalg.solve(inv_rr, a_inv[cols])


class Moments:
    """Σ z zᵀ of a projection's inputs, z = [x, 1] with ``intercept`` (float64), over the
    batches after the first ``skip`` (the held-out ones)."""

    def __init__(self, intercept: bool, skip: int = 0) -> None:
        self.intercept, self.sum, self.tokens = intercept, None, 0
        self.skip, self.seen = skip, 0

    def add(self, x: torch.Tensor) -> None:
        self.seen += 1
        if self.seen <= self.skip:
            return
        z = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.intercept:
            z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
        self.sum = z.T @ z if self.sum is None else self.sum.addmm_(z.T, z)
        self.tokens += len(z)

    def mean(self) -> torch.Tensor:
        """E[z zᵀ], in place of the sum."""
        return self.sum.div_(self.tokens)


@contextmanager
def compensated(module: torch.nn.Module, delta: torch.Tensor, n_in: int) -> Iterator[None]:
    """``module`` computing (W + ΔW) x + b + Δb while inside (ΔŴ = [ΔW, Δb] in (out, in[+1]))."""
    weight = delta[:, :n_in].T.contiguous()
    bias = delta[:, n_in] if delta.shape[1] > n_in else None

    def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        change = x.to(weight.dtype) @ weight
        if bias is not None:
            change = change + bias
        return output + change.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- the sub-models, through the flow -----------------------------------------------------------
def measure(
    ctx: ScoringContext, kind: str, settings: SubModel, intercept: bool
) -> tuple[list[LayerMeasure | None], torch.Tensor]:
    """Every layer's ``LayerMeasure`` (None: a block the base model removes) and the base
    model's per-window losses. Layers are taken ``settings.at_once`` at a time: one walk of the
    flow each, whose base stream gives every layer's input and carries the sub-models' streams
    (started at their layer) to the loss."""
    ctx.flow.set_base(ctx.removed)
    n = ctx.num_layers()
    measured: list[LayerMeasure | None] = [None] * n
    base = None
    at_once = settings.at_once if settings.calibrate else n
    batches = held_out(ctx.flow, settings.windows) if settings.calibrate else 0
    for first in range(0, n, at_once):
        chunk = range(first, min(n, first + at_once))
        streams: dict[int, list[torch.Tensor]] = {}
        final = None
        for step in ctx.flow.walk(0, desc=f"submodel ({kind}): layers {chunk[0]}..{chunk[-1]}"):
            for layer, hidden in streams.items():
                streams[layer] = ctx.flow.run(step.index, hidden)
            if step.index in chunk:
                measured[step.index], hidden = measure_layer(
                    ctx, kind, step, settings, intercept, batches
                )
                if hidden is not None:
                    streams[step.index] = hidden
            final = step.advance()
        if base is None and settings.calibrate:
            base = window_losses(ctx.flow, final[:batches])
        for layer, hidden in streams.items():
            measured[layer].losses = window_losses(ctx.flow, hidden)
        streams.clear()
    return measured, base


def measure_layer(
    ctx: ScoringContext, kind: str, step, settings: SubModel, intercept: bool, batches: int
) -> tuple[LayerMeasure, list[torch.Tensor] | None]:
    """Layer ``step.index``'s unit errors from its base inputs, and the output of its
    calibration sub-model (the lowest-error ``fraction`` of groups removed, compensated; None
    without ``calibrate``)."""
    module, columns = ctx.output_projection(step.index, kind)
    conv1d = ctx.adapter.width_layout(kind).conv1d
    weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
    moments = Moments(intercept, skip=batches if 0 < batches < len(step.hidden) else 0)
    step.run_until(module, moments.add)
    a_inv = damped_inverse(moments.mean(), weight.shape[1], settings.damping)
    del moments
    errors = obs_errors(weight, columns, a_inv)
    count = max(1, round(settings.fraction * len(errors)))
    removed = errors.argsort()[:count]
    if not settings.calibrate:
        return LayerMeasure(errors.cpu(), removed.cpu()), None
    cols = columns.to(weight.device)[removed].flatten()
    delta = compensation(weight, cols, a_inv).to(weight.dtype)
    del a_inv
    with compensated(module, delta.to(module.weight.dtype), weight.shape[1]):
        hidden = ctx.flow.run(step.index, step.hidden[:batches])
    return LayerMeasure(errors.cpu(), removed.cpu()), hidden


def held_out(flow, windows: int) -> int:
    """How many of the first batches the sub-models are measured on, held out from the fit:
    enough for ``windows`` (0: about 30% of the windows), at least one, and at least one left
    for the fit where there are two batches (one batch: fit and measure on the same)."""
    if len(flow.batches) == 1:
        return 1
    if windows == 0:
        windows = max(1, round(0.3 * len(flow.tokens)))
    total = 0
    for count, batch in enumerate(flow.batches, start=1):
        total += len(batch)
        if total >= windows:
            return min(count, len(flow.batches) - 1)
    return len(flow.batches) - 1


def window_losses(flow, final: list[torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL of each window of the first ``len(final)`` batches (float64)."""
    parts = [
        flow.session.token_nll(ids, hidden).mean(-1)
        for ids, hidden in zip(flow.batches, final, strict=False)
    ]
    return torch.cat(parts).cpu()


# --- loss units ----------------------------------------------------------------------------------
def layer_scales(
    measured: list[LayerMeasure | None], base: torch.Tensor, windows: int | None = None
) -> list[float]:
    """c_ℓ = mean Δloss of sub-model ℓ / Σ e of its removed groups (over the first ``windows``
    windows; all by default). A sub-model measured no worse than the model (Δloss ≤ 0) gets a
    tenth of the smallest positive scale: its ranking within the layer is kept, the layer is
    cheap to prune."""
    raw = []
    for m in measured:
        if m is None:
            raw.append(math.nan)
            continue
        change = float((m.losses[:windows] - base[:windows]).mean())
        removed_error = float(m.errors[m.removed].sum())
        raw.append(change / removed_error if removed_error > 0 else math.nan)
    positive = [c for c in raw if c > 0]
    floor = 0.1 * min(positive) if positive else 1.0
    return [c if c > 0 else floor for c in raw]  # NaN (no unit error) too


def record_details(
    ctx: ScoringContext,
    kind: str,
    measured: list[LayerMeasure | None],
    base: torch.Tensor,
    scales: list[float],
) -> None:
    """Each layer's scale and measured loss change, and the ranking's convergence with the
    number of calibration windows, in ``ctx.extras`` (saved with the checkpoint's record)."""
    changes = [None if m is None else round(float((m.losses - base).mean()), 6) for m in measured]
    ctx.extras.setdefault("submodel_scale", {})[kind] = [
        None if m is None else c for m, c in zip(measured, scales, strict=True)
    ]
    ctx.extras.setdefault("submodel_loss_change", {})[kind] = changes
    ctx.extras.setdefault("submodel_convergence", {})[kind] = convergence(measured, base)


def convergence(measured: list[LayerMeasure | None], base: torch.Tensor) -> list[dict]:
    """Spearman ρ of the scores from the first n windows (n = 1, 2, 4, …) with all of them."""
    kept = [m for m in measured if m is not None]
    final = torch.cat([m.errors * c for m, c in zip(kept, layer_scales(kept, base), strict=True)])
    curve, n = [], 1
    while n < len(base):
        scores = torch.cat(
            [m.errors * c for m, c in zip(kept, layer_scales(kept, base, n), strict=True)]
        )
        curve.append({"windows": n, "spearman": round(spearman(scores, final), 4)})
        n *= 2
    curve.append({"windows": len(base), "spearman": 1.0})
    return curve


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by position)."""
    ra, rb = (x.argsort().argsort().to(torch.float64) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))
