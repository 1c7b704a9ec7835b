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

Everything here is pure tensor math plus one pre-hook that rescales columns: weights are never
modified, nothing but (windows × groups) directions is stored, and no ``backward()`` runs.
How the passes are run (whole model, or from one layer's cached inputs) is the caller's choice:
``estimate_gates`` only needs a function returning the per-window losses of one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from secateurs.errors import ConfigError

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


def window_losses(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """Mean next-token NLL of each window (B,), float64 — the per-window ``calibration_loss``.

    Computed ``chunk`` positions at a time, so no second logits-sized tensor (the log-softmax)
    is held next to the logits.
    """
    total = torch.zeros(ids.shape[0], dtype=torch.float64, device=ids.device)
    steps = ids.shape[1] - 1
    for start in range(0, steps, chunk):
        part = logits[:, start : min(start + chunk, steps)]
        part = part.to(torch.promote_types(part.dtype, torch.float32))  # bf16 → f32, f64 stays
        target = ids[:, start + 1 : start + 1 + part.shape[1]]
        nll = F.cross_entropy(part.transpose(1, 2), target, reduction="none")
        total += nll.to(torch.float64).sum(-1)
    return total / steps


def projected_gradients(
    plus: torch.Tensor, other: torch.Tensor, epsilon: float, antithetic: bool
) -> torch.Tensor:
    """p_b per window from the perturbed losses: central (antithetic) or one-sided."""
    return (plus - other) / (2 * epsilon if antithetic else epsilon)


def spsa_sum(projected: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Σ_b p_b z_b (groups,) float64; divide by the number of (direction, window) samples."""
    return projected.to(torch.float64) @ directions.to(torch.float64)


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
    """Gates perturbed together: per output projection, its groups' input columns (groups,
    members) out of ``in_features``, and each group's direction scale σ_g (1: plain SPSA)."""

    modules: tuple[nn.Module, ...]
    columns: tuple[torch.Tensor, ...]
    in_features: tuple[int, ...]
    scales: tuple[torch.Tensor, ...]

    def pick(self, indices: Sequence[int]) -> GateSet:
        """The gates of some modules alone."""
        pick = lambda items: tuple(items[i] for i in indices)  # noqa: E731
        return GateSet(
            *(pick(f) for f in (self.modules, self.columns, self.in_features, self.scales))
        )


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


def estimate_gates(
    run: Callable[[], torch.Tensor],
    gates: GateSet,
    shape: tuple[int, int],
    settings: SPSASettings,
    generator: torch.Generator,
    bar: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
    base: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """â (groups,) float64 for each module of ``gates``, all perturbed together.

    ``run()`` does one pass over the calibration windows (``shape``: windows, tokens), in
    order, and returns their losses (windows,); ``base``: those losses unperturbed, if already
    known (one-sided).
    With u = σ ⊙ z the perturbation, E[p · z / σ] = a: the estimate is unbiased for any σ.
    """
    windows, length = shape
    sums = [torch.zeros(c.shape[0], dtype=torch.float64) for c in gates.columns]
    if not settings.antithetic and base is None:
        base = run()
    for _ in bar(range(settings.num_perturbations), "mini-llm: perturbations"):
        z = [
            gate_directions(windows, c.shape[0], generator, settings.distribution)
            for c in gates.columns
        ]
        plus = _perturbed_run(run, gates, z, settings.epsilon, length)
        other = (
            _perturbed_run(run, gates, z, -settings.epsilon, length)
            if settings.antithetic
            else base
        )
        p = projected_gradients(plus, other, settings.epsilon, settings.antithetic)
        for total, direction, scale in zip(sums, z, gates.scales, strict=True):
            total += spsa_sum(p, direction / scale)
    return [total / (settings.num_perturbations * windows) for total in sums]


def _perturbed_run(
    run, gates: GateSet, z: list[torch.Tensor], step: float, length: int
) -> torch.Tensor:
    multipliers = [
        column_multipliers(d * scale, c, n, step)
        for d, c, n, scale in zip(z, gates.columns, gates.in_features, gates.scales, strict=True)
    ]
    with gated(gates.modules, multipliers, length):
        return run()
