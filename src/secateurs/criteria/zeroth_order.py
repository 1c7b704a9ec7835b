"""Forward-only gradient estimates (SPSA / MeZO style) for memory-light criteria.

For parameters θ (here: the output projections that define width groups), K seeded random
directions Z_k ~ N(0, I) give two-sided projected gradients

    p_k = (L(θ + εZ_k) − L(θ − εZ_k)) / 2ε ≈ ⟨∇L, Z_k⟩,       Ĝ = (1/K) Σ_k p_k Z_k.

Nothing gradient-sized is ever stored: a perturbation is applied inside a forward hook
(y += ±ε·x Z_kᵀ), its Z_k regenerated from (seed, k, parameter) one layer at a time, so the
weights are never modified (no drift) and peak memory stays at inference level plus one
direction per layer. Only the K scalars p_k are kept; Ĝ is rebuilt one parameter at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from secateurs.criteria.base import ScoringContext, calibration_loss


def direction(
    shape: torch.Size, seed: int, k: int, index: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Z_k for parameter ``index``: standard normal, reproducible from (seed, k, index).

    ``out`` is a reusable buffer: regenerating thousands of directions into the same memory
    keeps the allocator from growing the heap (peak memory is the point of this criterion).
    """
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + k) * 10_007 + index) % 2**62)
    return torch.randn(shape, generator=generator, out=out)


class _Buffers:
    """One float32 buffer per weight shape, reused for every direction of that shape."""

    def __init__(self) -> None:
        self._by_shape: dict[torch.Size, torch.Tensor] = {}

    def get(self, shape: torch.Size) -> torch.Tensor:
        if shape not in self._by_shape:
            self._by_shape[shape] = torch.empty(shape)
        return self._by_shape[shape]


@contextmanager
def perturbed(
    modules: Sequence[nn.Module], conv1d: bool, sign: float, epsilon: float, seed: int, k: int
) -> Iterator[None]:
    """Run forwards as if each module's weight were W + sign·ε·Z_k (W untouched)."""
    buffers = _Buffers()

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            shape = module.weight.shape
            z = direction(shape, seed, k, index, buffers.get(shape)).to(output)
            x = args[0]
            delta = x @ z if conv1d else x @ z.T  # Conv1D stores (in, out); Linear (out, in)
            return output.add_(delta, alpha=sign * epsilon)

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def mean_loss(ctx: ScoringContext) -> float:
    losses = [float(calibration_loss(ctx.model, batch)) for batch in ctx.batches()]
    return sum(losses) / len(losses)


@torch.no_grad()
def projected_gradients(
    ctx: ScoringContext,
    modules: Sequence[nn.Module],
    conv1d: bool,
    num_perturbations: int,
    epsilon: float,
    seed: int,
) -> list[float]:
    """The K two-sided finite-difference scalars p_k (2K forward passes over calibration)."""
    scalars = []
    for k in ctx.bar(range(num_perturbations), "mini-llm: perturbations"):
        with perturbed(modules, conv1d, +1.0, epsilon, seed, k):
            plus = mean_loss(ctx)
        with perturbed(modules, conv1d, -1.0, epsilon, seed, k):
            minus = mean_loss(ctx)
        scalars.append((plus - minus) / (2 * epsilon))
    return scalars


def estimated_gradient(
    module: nn.Module, index: int, scalars: Sequence[float], seed: int
) -> torch.Tensor:
    """Ĝ = (1/K) Σ_k p_k Z_k for one module's weight, rebuilt from the seeds (float64)."""
    shape = module.weight.shape
    total = torch.zeros(shape, dtype=torch.float64)
    z = torch.empty(shape)
    for k, p in enumerate(scalars):
        total.add_(direction(shape, seed, k, index, z), alpha=p)
    return (total / len(scalars)).to(module.weight.device)
