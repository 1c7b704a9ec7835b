"""``submodel`` (alias ``forward``): forward-only importance, the re-fit error of each unit in
its layer, put in loss units by measuring sub-models. No ``backward()``.

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
unit of it costs differs by layer (the identity stands in for S). For each layer ℓ the first
``windows`` calibration windows are run through the *sub-model* that removes the layer's
``fraction`` lowest-e groups (their columns zeroed), from ℓ's input to the output, and

    c_ℓ = KL(model ‖ sub-model ℓ) / E_ℓ,        score_g = c_ℓ · e_g

with KL the mean over predicted tokens of the next-token distributions' divergence and E_ℓ the
mean squared change the removal made to the layer's output on those tokens (measured by a
hook). c_ℓ is what a unit of output error at layer ℓ costs downstream — the scalar stand-in
for S, an expected (Fisher) curvature, so ``influence``'s dropped first-order term stays
dropped. The sub-model is measured plainly, not compensated: no fit, so no in-sample optimism
(a compensation fitted on 10 windows of 128 tokens reproduces them exactly — 1,536 MLP inputs —
and the loss change it shows called whole MLPs free: SmolLM2-135M ``global-27``, WikiText-2
PPL 2,324; held-out windows made it noise: Δloss < 0 in a third of the layers). Scores are
predicted calibration-loss changes (``loss_scores``: global allocation ranks them per
parameter, no sensitivity probe).

A sub-model is a partial forward: the streams of ``streams`` layers at a time advance in
lockstep with the base stream through the one flow, each layer loaded once per group of
layers, in memory or from disk alike; only the current layer's second moment is held. The
convergence of the ranking with the number of windows is saved (``submodel_convergence``:
Spearman of the scores from the first n windows with all of them), with each layer's scale.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.defaults import RECONSTRUCT_DAMPING
from secateurs.errors import ConfigError
from secateurs.units.width import can_add_intercept, output_weight_columns

LOSSES = ("kl", "nll")  # what a sub-model's loss change is measured as (kl: the default)


@dataclass
class LayerMeasure:
    """One layer's unit errors (groups,), its sub-model's removed groups, and per measured
    window the squared output change the removal made (``injected``) and the KL it caused."""

    errors: torch.Tensor
    removed: torch.Tensor
    injected: torch.Tensor | None = None
    divergence: torch.Tensor | None = None


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
        windows: int = 4,
        streams: int = 32,
        calibrate: bool = True,
        loss: str = "kl",
        centre: bool = False,
    ) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"submodel: loss must be one of {', '.join(LOSSES)}, got {loss!r}.")
        if not 0 < fraction < 1:
            raise ConfigError(f"submodel: fraction must be in (0, 1), got {fraction}.")
        if not damping > 0:
            raise ConfigError(f"submodel: damping must be > 0, got {damping}.")
        if int(windows) < 0:
            raise ConfigError(f"submodel: windows must be ≥ 0 (0: all), got {windows}.")
        if int(streams) < 1:
            raise ConfigError(f"submodel: streams must be ≥ 1, got {streams}.")
        self.fraction, self.damping = float(fraction), float(damping)
        self.intercept, self.windows, self.at_once = intercept, int(windows), int(streams)
        self.calibrate, self.loss, self.centre = bool(calibrate), loss, bool(centre)

    def options(self) -> dict[str, object]:
        return {
            "fraction": self.fraction,
            "damping": self.damping,
            "intercept": self.intercept,
            "windows": self.windows,
            "streams": self.at_once,
            "calibrate": self.calibrate,
            "loss": self.loss,
            "centre": self.centre,
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
        measured = measure(ctx, kind, self, bool(intercept))
        if not self.calibrate:  # the ablation: raw output errors, one unit for every layer
            return [torch.empty(0) if m is None else m.errors for m in measured]
        scales = layer_scales(measured)
        scores = [
            m.errors * s if m is not None else torch.empty(0, dtype=torch.float64)
            for m, s in zip(measured, scales, strict=True)
        ]
        record_details(ctx, kind, measured, scales)
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
    re-fits the others (and the intercept) by damped least squares — the re-fit e_g prices."""
    inv_rr = a_inv[cols][:, cols]
    return -weight[:, cols] @ torch.linalg.solve(inv_rr, a_inv[cols])


class Moments:
    """Σ z zᵀ of a projection's inputs, z = [x, 1] with ``intercept`` (float64)."""

    def __init__(self, intercept: bool) -> None:
        self.intercept, self.sum, self.tokens = intercept, None, 0

    def add(self, x: torch.Tensor) -> None:
        z = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.intercept:
            z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
        self.sum = z.T @ z if self.sum is None else self.sum.addmm_(z.T, z)
        self.tokens += len(z)

    def mean(self) -> torch.Tensor:
        """E[z zᵀ], in place of the sum."""
        return self.sum.div_(self.tokens)


@contextmanager
def columns_removed(
    module: torch.nn.Module,
    cols: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor | None = None,
) -> Iterator[list[torch.Tensor]]:
    """``module`` computing W x without the input columns ``cols`` while inside (``weight``:
    W as (out, in)); with ``mean`` (E[x_cols]) the columns are replaced by their mean instead
    (the intercept a re-fit would give them); yields the per-window mean squared output
    change, one tensor per batch."""
    w = weight[:, cols].T.contiguous()  # (|R|, out)
    centre = None if mean is None else mean.to(w.dtype)
    injected: list[torch.Tensor] = []

    def hook(mod: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        removed = args[0][..., cols].to(w.dtype)
        change = (removed if centre is None else removed - centre) @ w
        injected.append(change.pow(2).sum(-1).flatten(1).mean(1).to(torch.float64).cpu())
        return output - change.to(output.dtype)

    handle = module.register_forward_hook(hook)
    try:
        yield injected
    finally:
        handle.remove()


# --- the sub-models, through the flow -----------------------------------------------------------
def measure(
    ctx: ScoringContext, kind: str, settings: SubModel, intercept: bool
) -> list[LayerMeasure | None]:
    """Every layer's ``LayerMeasure`` (None: a block the base model removes). Layers are taken
    ``settings.at_once`` at a time: one walk of the flow each, whose base stream gives every
    layer's input and carries the sub-models' streams (started at their layer) to the output."""
    ctx.flow.set_base(ctx.removed)
    n = ctx.num_layers()
    measured: list[LayerMeasure | None] = [None] * n
    at_once = settings.at_once if settings.calibrate else n
    batches = measured_batches(ctx.flow, settings.windows) if settings.calibrate else 0
    for first in range(0, n, at_once):
        chunk = range(first, min(n, first + at_once))
        streams: dict[int, list[torch.Tensor]] = {}
        final: list[torch.Tensor] = []
        for step in ctx.flow.walk(0, desc=f"submodel ({kind}): layers {chunk[0]}..{chunk[-1]}"):
            for layer, hidden in streams.items():
                streams[layer] = ctx.flow.run(step.index, hidden)
            if step.index not in chunk:
                final = step.advance()
                continue
            final, moments = advance_gathering(ctx, kind, step, intercept)
            measured[step.index], hidden = measure_layer(
                ctx, kind, step, settings, moments, batches
            )
            if hidden is not None:
                streams[step.index] = hidden
        divergences(ctx.flow, final[:batches], streams, measured, settings.loss)
    return measured


def advance_gathering(
    ctx: ScoringContext, kind: str, step, intercept: bool
) -> tuple[list[torch.Tensor], Moments]:
    """Advance the base stream through layer ``step.index``, gathering its output projection's
    input moments on the way (no second pass for them)."""
    moments = Moments(intercept)
    module, _ = ctx.output_projection(step.index, kind)
    handle = module.register_forward_pre_hook(lambda m, args: moments.add(args[0]))
    try:
        return step.advance(), moments
    finally:
        handle.remove()


def measure_layer(
    ctx: ScoringContext, kind: str, step, settings: SubModel, moments: Moments, batches: int
) -> tuple[LayerMeasure | None, list[torch.Tensor] | None]:
    """Layer ``step.index``'s unit errors from its inputs' ``moments``, and the output of its
    sub-model (the lowest-error ``fraction`` of groups removed) on the first ``batches``
    batches (None: 0). None, None where the projection did not run (a branch the base model
    removes)."""
    if moments.tokens == 0:
        return None, None
    module, columns = ctx.output_projection(step.index, kind)
    conv1d = ctx.adapter.width_layout(kind).conv1d
    weight = output_weight_columns(module, conv1d).detach()
    a = moments.mean()
    centred = settings.centre and moments.intercept
    # E[x], the intercept column; a copy, so the matrix itself can be freed after its inverse
    mean = a[: weight.shape[1], -1].clone() if centred else None
    a_inv = damped_inverse(a, weight.shape[1], settings.damping)
    moments.sum = None
    errors = obs_errors(weight.to(torch.float64), columns, a_inv)
    del a_inv
    count = max(1, round(settings.fraction * len(errors)))
    removed = errors.argsort()[:count]
    measure = LayerMeasure(errors.cpu(), removed.cpu())
    if batches == 0:
        return measure, None
    cols = columns.to(weight.device)[removed].flatten()
    shift = None if mean is None else mean[cols.cpu()].to(weight.device)
    with columns_removed(module, cols, weight, shift) as injected:
        hidden = ctx.flow.run(step.index, step.hidden[:batches])
    measure.injected = torch.cat(injected)
    return measure, hidden


def measured_batches(flow, windows: int) -> int:
    """The first batches the sub-models run on: enough for ``windows`` (0: all)."""
    total = 0
    for count, batch in enumerate(flow.batches, start=1):
        total += len(batch)
        if windows and total >= windows:
            return count
    return len(flow.batches)


def divergences(
    flow,
    final: list[torch.Tensor],
    streams: dict[int, list[torch.Tensor]],
    measured: list,
    loss: str = "kl",
) -> None:
    """Each stream's per-window loss change into ``measured[layer].divergence``: KL(model ‖
    sub-model) of the next-token distributions (``kl``) or the change of the next-token NLL
    (``nll``); ``POSITIONS`` positions of a batch at a time, the model's log-probabilities
    computed once for all streams (so no logits-sized tensor is held)."""
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in streams}
    for b, (ids, hidden) in enumerate(zip(flow.batches, final, strict=False)):
        totals = {layer: torch.zeros(len(ids), dtype=torch.float64) for layer in streams}
        steps = ids.shape[1] - 1  # predicted positions
        for start in range(0, steps, POSITIONS):
            at = slice(start, min(start + POSITIONS, steps))
            base = log_probs(flow.session, ids[:, at], hidden[:, at])
            targets = ids[:, at.start + 1 : at.stop + 1].unsqueeze(-1).to(base.device)
            for layer, outputs in streams.items():
                sub = log_probs(flow.session, ids[:, at], outputs[b][:, at])
                if loss == "nll":
                    change = (base - sub).gather(-1, targets)
                else:
                    change = base.exp() * (base - sub)
                totals[layer] += change.sum((-1, -2)).cpu()
                del sub
            del base
        for layer, total in totals.items():
            parts[layer].append(total / steps)
    for layer, values in parts.items():
        measured[layer].divergence = torch.cat(values)


POSITIONS = 16  # positions whose logits are held at once (float64)


def log_probs(session, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities (float64) from last-layer outputs ``hidden`` of positions
    ``ids`` (every position's logits depend on its own hidden state only)."""
    return torch.log_softmax(session.logits(ids, hidden).to(torch.float64), -1)


# --- loss units ----------------------------------------------------------------------------------
def layer_scales(measured: list[LayerMeasure | None], windows: int | None = None) -> list[float]:
    """c_ℓ = mean KL of sub-model ℓ / mean squared output change it injected (over the first
    ``windows`` measured windows; all by default). A removal that changed nothing (E = 0) gets
    the smallest measured scale."""
    raw = []
    for m in measured:
        if m is None:
            raw.append(0.0)
            continue
        injected = float(m.injected[:windows].mean())
        raw.append(float(m.divergence[:windows].mean()) / injected if injected > 0 else 0.0)
    positive = [c for c in raw if c > 0]
    floor = min(positive) if positive else 1.0
    return [c if c > 0 else floor for c in raw]


def record_details(
    ctx: ScoringContext, kind: str, measured: list[LayerMeasure | None], scales: list[float]
) -> None:
    """Each layer's scale and sub-model KL, and the ranking's convergence with the number of
    measured windows, in ``ctx.extras`` (saved with the checkpoint's record)."""
    ctx.extras.setdefault("submodel_scale", {})[kind] = [
        None if m is None else c for m, c in zip(measured, scales, strict=True)
    ]
    ctx.extras.setdefault("submodel_divergence", {})[kind] = [
        None if m is None else float(m.divergence.mean()) for m in measured
    ]
    ctx.extras.setdefault("submodel_convergence", {})[kind] = convergence(measured)


def convergence(measured: list[LayerMeasure | None]) -> list[dict]:
    """Spearman ρ of the scores from the first n windows (n = 1, 2, 4, …) with all of them."""
    kept = [m for m in measured if m is not None]
    windows = len(kept[0].divergence)

    def scores(n: int | None) -> torch.Tensor:
        return torch.cat([m.errors * c for m, c in zip(kept, layer_scales(kept, n), strict=True)])

    final, curve, n = scores(None), [], 1
    while n < windows:
        curve.append({"windows": n, "spearman": round(spearman(scores(n), final), 4)})
        n *= 2
    return [*curve, {"windows": windows, "spearman": 1.0}]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation (ties broken by position)."""
    ra, rb = (x.argsort().argsort().to(torch.float64) for x in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-30))
