"""Forward-only estimates of *gate* gradients: SPSA over one scalar gate per width group.

Give every width group g of a layer (a KV head group, an MLP channel) a gate s_g that scales
its input columns of the output projection (o_proj / down_proj) — at s = 1 the model is
unchanged, at s_g = 0 the group is removed. The gate gradient

    a_g = ∂L/∂s_g |_{s=1} = Σ_{j ∈ c(g)} Σ_i W_ij ∂L/∂W_ij

is the first-order loss change of scaling the group, i.e. −a_g predicts removing it. It lives in
the space that decides the pruning: one number per group instead of one per weight.

Estimator. Calibration windows do not interact, so window b gets its own random direction
z_b (Rademacher, ±1 per group) in every forward, and its loss L_b its own projected gradient

    p_b = (L_b(1 + εz_b) − L_b(1 − εz_b)) / 2ε ≈ ⟨∇L_b, z_b⟩         (antithetic pair)
    p_b = (L_b(1 + εz_b) − L_b(1)) / ε                                (one-sided, shared base)

and â = mean_{k, b} p_{kb} z_{kb} is an unbiased estimate of the gradient of the mean window
loss with K·N samples from K (or 2K) passes, instead of K from a direction shared by the batch.
The spread of the windows' own estimates gives each â_g's variance for free, and with it a
layer's signal-to-noise ratio (``signal_to_noise``): whether the estimate says anything at all.

Everything here is pure tensor math plus one pre-hook that rescales columns: weights are never
modified, nothing but (windows × groups) directions is stored, and no ``backward()`` runs.
The estimator says which perturbed models it needs (``spsa_perturbations``: one
``edits.Perturbation`` per direction and sign) and combines their losses
(``gate_estimates``); how the passes run — one after the other in memory, or every stream in
lockstep layer by layer from disk — is the flow's business, so both give the same â.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from secateurs.edits import Perturbation
from secateurs.errors import ConfigError
from secateurs.units.width import output_projection

DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SPSASettings:
    """How gate gradients are estimated: K directions per window, step ε, pairing, seed."""

    num_perturbations: int = 8
    epsilon: float = 1e-2
    antithetic: bool = True
    distribution: str = "rademacher"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_perturbations < 1:
            raise ConfigError(f"num_perturbations must be ≥ 1, got {self.num_perturbations}.")
        if not self.epsilon > 0:
            raise ConfigError(f"epsilon must be positive, got {self.epsilon}.")
        if not isinstance(self.antithetic, bool):
            raise ConfigError(f"antithetic must be true or false, got {self.antithetic!r}.")
        if self.distribution not in DISTRIBUTIONS:
            raise ConfigError(
                f"unknown distribution {self.distribution!r}; expected one of {DISTRIBUTIONS}."
            )

    def passes(self) -> int:
        """Passes over the calibration windows per set of gates perturbed together."""
        return 2 * self.num_perturbations if self.antithetic else self.num_perturbations + 1


# --- pure math ----------------------------------------------------------------------------------
def gate_directions(
    windows: int, groups: int, generator: torch.Generator, distribution: str = "rademacher"
) -> torch.Tensor:
    """One direction per window (windows, groups): ±1 (Rademacher) or N(0, 1), E[zzᵀ] = I."""
    if distribution == "gaussian":
        return torch.randn(windows, groups, generator=generator)
    bits = torch.randint(0, 2, (windows, groups), generator=generator)
    return bits.float().mul_(2).sub_(1)


def column_multipliers(
    directions: torch.Tensor, columns: torch.Tensor, in_features: int, step: float
) -> torch.Tensor:
    """(windows, in_features): 1 + step·z_{b,g} on group g's columns, 1 elsewhere."""
    out = torch.ones(directions.shape[0], in_features, dtype=torch.float64)  # exact 1 ± εz
    out[:, columns.flatten()] += step * directions.double().repeat_interleave(columns.shape[1], 1)
    return out


def projected_gradients(
    plus: torch.Tensor, other: torch.Tensor, epsilon: float, antithetic: bool
) -> torch.Tensor:
    """p_b per window from the perturbed losses: central (antithetic) or one-sided."""
    return (plus - other) / (2 * epsilon if antithetic else epsilon)


# --- the perturbation ---------------------------------------------------------------------------
@contextmanager
def gated(
    modules: Sequence[nn.Module], multipliers: Sequence[torch.Tensor], length: int
) -> Iterator[None]:
    """Scale the input columns of ``modules[i]`` by ``multipliers[i]`` (windows, in), window by
    window: each forward consumes the next rows (a cursor per module), so a pass over the
    windows in order in any batch size sees each window's own direction. ``length``: tokens
    per window, for projections that see tokens flattened to (B·T, in) (OPT)."""
    handles = []
    try:
        for module, multiplier in zip(modules, multipliers, strict=True):
            handles.append(module.register_forward_pre_hook(_scaling_hook(multiplier, length)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _scaling_hook(multiplier: torch.Tensor, length: int):
    cursor = [0]

    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        tokens = x.reshape(-1, length, x.shape[-1])  # (B, T, in) whatever the layout
        rows = multiplier[cursor[0] : cursor[0] + tokens.shape[0]]
        cursor[0] += tokens.shape[0]
        return ((tokens * rows[:, None, :].to(x)).reshape(x.shape), *args[1:])

    return hook


# --- the estimator ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateSet:
    """Gates perturbed together: per layer, its output projection's groups' input columns
    (groups, members) out of ``in_features``, and each group's direction scale σ_g (1: plain
    SPSA)."""

    layers: tuple[int, ...]
    columns: tuple[torch.Tensor, ...]
    in_features: tuple[int, ...]
    scales: tuple[torch.Tensor, ...]

    def pick(self, indices: Sequence[int]) -> GateSet:
        """The gates of some layers alone (positions in this set)."""
        pick = lambda items: tuple(items[i] for i in indices)  # noqa: E731
        return GateSet(
            *(pick(f) for f in (self.layers, self.columns, self.in_features, self.scales))
        )


@dataclass(frozen=True)
class GateEdit:
    """A layer's gates at 1 + step·u_b for window b (u: (windows, groups), σ ⊙ z): its output
    projection's input columns scaled window by window (a ``flow.Edit``)."""

    kind: str
    columns: torch.Tensor
    in_features: int
    directions: torch.Tensor
    step: float
    length: int  # tokens per window
    skip = False

    def applied(self, session: Any, layer: int) -> AbstractContextManager:
        module = output_projection(session.model, session.adapter, layer, self.kind)[0]
        multipliers = column_multipliers(self.directions, self.columns, self.in_features, self.step)
        return gated([module], [multipliers], self.length)


def prior_scales(priors: Sequence[torch.Tensor], power: float) -> list[torch.Tensor]:
    """σ_g ∝ prior_g^(−power), RMS 1 over all groups (power 0: all 1).

    SPSA's error on a_g is ≈ ‖σ ⊙ a‖ / σ_g; if |a_g| grows with the prior, perturbing groups with
    small priors more evens out the relative errors, which is what a ranking needs. Priors are
    floored at 1e-3 × their median so that a dead group's step stays finite.
    """
    flat = torch.cat([p.to(torch.float64).flatten() for p in priors])
    floor = 1e-3 * flat.median().clamp_min(1e-30)
    raw = [p.to(torch.float64).clamp_min(floor).pow(-power) for p in priors]
    rms = torch.cat(raw).pow(2).mean().sqrt()
    return [(r / rms).float() for r in raw]


def draw_directions(
    gates: GateSet, windows: int, settings: SPSASettings, generator: torch.Generator
) -> list[list[torch.Tensor]]:
    """K draws, each one direction (windows, groups) per layer of ``gates``, in that order."""
    return [
        [
            gate_directions(windows, c.shape[0], generator, settings.distribution)
            for c in gates.columns
        ]
        for _ in range(settings.num_perturbations)
    ]


def signed_steps(settings: SPSASettings) -> tuple[float, ...]:
    """The steps each draw is run at: ±ε (antithetic) or +ε (against the shared base)."""
    return (settings.epsilon, -settings.epsilon) if settings.antithetic else (settings.epsilon,)


def spsa_perturbations(
    gates: GateSet,
    kind: str,
    draws: list[list[torch.Tensor]],
    settings: SPSASettings,
    start: int,
    length: int,
) -> list[Perturbation]:
    """The perturbed models of ``draws`` (draw-major, then step), running from layer ``start``."""
    return [
        Perturbation(
            start,
            {
                layer: GateEdit(kind, cols, n, z * scale, step, length)
                for layer, cols, n, z, scale in zip(
                    gates.layers, gates.columns, gates.in_features, draw, gates.scales, strict=True
                )
            },
        )
        for draw in draws
        for step in signed_steps(settings)
    ]


@dataclass(frozen=True)
class GateEstimate:
    """One layer's â (groups,) float64 and the estimated variance of each â_g (NaN from fewer
    than 2 windows). E[â_g²] = a_g² + v_g, which is what ``signal_to_noise`` reads."""

    mean: torch.Tensor
    variance: torch.Tensor


def gate_estimates(
    losses: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    gates: GateSet,
    draws: list[list[torch.Tensor]],
    settings: SPSASettings,
) -> list[GateEstimate]:
    """â and its variance per layer of ``gates`` from the losses (windows,) of
    ``spsa_perturbations``' models, in their order; ``base``: the unperturbed losses
    (one-sided). With u = σ ⊙ z the perturbation, E[p · z / σ] = a: unbiased for any σ."""
    if not settings.antithetic and base is None:
        raise ValueError("one-sided differences need the unperturbed losses")
    per_draw = len(signed_steps(settings))
    projected = []  # p (windows,) per draw
    for k in range(len(draws)):
        runs = losses[k * per_draw : (k + 1) * per_draw]
        other = runs[1] if settings.antithetic else base
        projected.append(projected_gradients(runs[0], other, settings.epsilon, settings.antithetic))
    estimates = []
    for i, scale in enumerate(gates.scales):  # one layer's (windows, groups) at a time
        per_window = sum(
            window_terms(p, draw[i] / scale) for p, draw in zip(projected, draws, strict=True)
        )
        per_window = per_window / len(draws)
        estimates.append(GateEstimate(per_window.mean(0), variance_of_mean(per_window)))
    return estimates


def window_terms(projected: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """p_b z_b per window (windows, groups) float64: each window's one-sample estimate."""
    return projected.to(torch.float64)[:, None] * directions.to(torch.float64)


def variance_of_mean(per_window: torch.Tensor) -> torch.Tensor:
    """The estimated variance of the mean over windows of per-window estimates (windows,
    groups): their sample variance over their number. Windows, not (direction, window) terms,
    are the independent draws: a window's K terms share its own gradient, so this counts both
    SPSA's cross terms and the windows' spread around the gradient of the population they
    come from. NaN below 2 windows."""
    windows = per_window.shape[0]
    if windows < 2:
        return torch.full(per_window.shape[1:], float("nan"), dtype=per_window.dtype)
    return per_window.var(0) / windows


def signal_to_noise(estimate: GateEstimate) -> float:
    """A layer's estimated signal-to-noise power ratio, (mean_g â_g² − mean_g v_g) / mean_g v_g.

    E[â_g²] = a_g² + v_g, so the numerator estimates the mean squared gate gradient and the
    ratio is ≈ 0 (either sign) when â is noise. Below 1 the noise outweighs what it estimates
    and a ranking of |â| is mostly a ranking of noise. NaN when it cannot tell (fewer than 2
    windows; a removed branch's gates, all exactly 0).
    """
    noise, power = float(estimate.variance.mean()), float(estimate.mean.pow(2).mean())
    if noise > 0:
        return (power - noise) / noise
    return float("inf") if noise == 0 and power > 0 else float("nan")  # exact, or no gates
