"""``mini-llm``: feature-map sensitivity with forward-only gradients (MINI-LLM, Cheng et al. 2024).

MINI-LLM scores structures by combining weight magnitude, activation magnitude and gradient
magnitude, the gradient being *estimated from forward passes only* so that pruning needs the
memory of inference, not of backpropagation. What we implement, per width group g (an MLP
channel, or a KV head group) of each layer's output projection W (o_proj / down_proj):

    score_g = Σ_{j ∈ columns(g)} Σ_i |W_ij| · |Ĝ_ij| · ‖X_j‖₂

with ‖X_j‖₂ the norm of input feature j over all calibration tokens (the feature map), and Ĝ
the SPSA estimate of ∂L/∂W from ``num_perturbations`` two-sided seeded perturbations (see
``zeroth_order``). No ``backward()`` runs anywhere on this path; the paper leaves the
perturbation distribution and the aggregation open: we use Gaussian directions, ε = 1e-3
(MeZO's default) and the sum over the group.

Cost: 2K + 1 forward passes over the calibration set, K·(params of the output projections)
random numbers regenerated twice. Memory: weights + activations of one forward + one direction
per layer at a time.
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, columns_per_group, input_statistics
from secateurs.criteria.zeroth_order import estimated_gradient, projected_gradients
from secateurs.errors import ConfigError
from secateurs.units import masked
from secateurs.width import output_weight_columns


@CRITERIA.register("mini-llm", aliases=("minillm",))
class MiniLLM(Criterion):
    name = "mini-llm"
    units = frozenset({"heads", "channels"})
    summary = "Σ|W|·|Ĝ|·‖X‖ per group, Ĝ from forward passes only (SPSA; no backprop)"

    def __init__(self, num_perturbations: int = 32, epsilon: float = 1e-3, seed: int = 0) -> None:
        if num_perturbations < 1:
            raise ConfigError(f"mini-llm: num_perturbations must be ≥ 1, got {num_perturbations}.")
        if not epsilon > 0:
            raise ConfigError(f"mini-llm: epsilon must be positive, got {epsilon}.")
        self.num_perturbations, self.epsilon, self.seed = (
            int(num_perturbations),
            float(epsilon),
            int(seed),
        )

    def options(self) -> dict[str, float]:
        return {
            "num_perturbations": self.num_perturbations,
            "epsilon": self.epsilon,
            "seed": self.seed,
        }

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        conv1d = ctx.adapter.width_layout(kind).conv1d
        projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
        modules = [module for module, _ in projections]
        with masked(ctx.model, ctx.adapter, ctx.removed):
            stats = input_statistics(ctx, kind, "mini-llm: inputs")
            scalars = projected_gradients(
                ctx, modules, conv1d, self.num_perturbations, self.epsilon, self.seed
            )
        ctx.extras.setdefault("projected_gradients", {})[kind] = scalars
        scores = []
        for index, ((module, columns), stat) in enumerate(zip(projections, stats, strict=True)):
            g_hat = estimated_gradient(module, index, scalars, self.seed)
            g_cols = output_weight_columns_like(g_hat, conv1d)
            weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
            per_column = (weight.abs() * g_cols.abs()).sum(0) * stat.norm.to(weight.device)
            scores.append(columns_per_group(per_column, columns).cpu())
        return scores


def output_weight_columns_like(values: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """A weight-shaped tensor as (out, in), matching ``output_weight_columns``."""
    return values.T if conv1d else values
