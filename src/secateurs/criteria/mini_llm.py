"""``mini-llm``: magnitude × activation × forward-only gradient (MINI-LLM, Cheng et al. 2024).

MINI-LLM scores a structure by |W| · ‖X‖ · |G|, with the gradient G estimated from forward
passes only, so that pruning needs the memory of inference. We estimate the gradient where it
decides the pruning: one gate per width group g (head group / channel) scaling g's input columns
of the layer's output projection W (o_proj / down_proj). Per group:

    score_g = M_g · |â_g|,     M_g = Σ_{j ∈ c(g)} Σ_i |W_ij| · ‖X_j‖₂,     â_g ≈ ∂L/∂s_g

(``combine="gate"``: |â_g| alone, the group-level first-order Taylor estimate). â comes from
SPSA with one direction per calibration window (``zeroth_order``); ``scope="model"`` perturbs
every layer's gates in the same passes over the whole model, ``scope="layer"`` one layer at a
time, running only layers ℓ.. from cached layer inputs (``LayerRunner``). No ``backward()``.
"""

from __future__ import annotations

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, columns_per_group, input_statistics
from secateurs.criteria.zeroth_order import SPSASettings, estimate_gates, window_losses
from secateurs.errors import ConfigError
from secateurs.layerwise import LayerRunner
from secateurs.units import masked
from secateurs.width import output_weight_columns

SCOPES = ("model", "layer")
COMBINATIONS = ("paper", "gate")


@CRITERIA.register("mini-llm", aliases=("minillm",))
class MiniLLM(Criterion):
    name = "mini-llm"
    units = frozenset({"heads", "channels"})
    summary = "Σ|W|·‖X‖ × |gate gradient| per group, the gradient from forward passes (SPSA)"

    def __init__(
        self,
        num_perturbations: int = 8,
        epsilon: float = 1e-2,
        antithetic: bool = True,
        distribution: str = "rademacher",
        seed: int = 0,
        scope: str = "model",
        combine: str = "paper",
    ) -> None:
        self.settings = SPSASettings(
            int(num_perturbations), float(epsilon), bool(antithetic), distribution, int(seed)
        )
        if scope not in SCOPES:
            raise ConfigError(f"mini-llm: unknown scope {scope!r}; expected one of {SCOPES}.")
        if combine not in COMBINATIONS:
            raise ConfigError(
                f"mini-llm: unknown combine {combine!r}; expected one of {COMBINATIONS}."
            )
        self.scope, self.combine = scope, combine

    def options(self) -> dict:
        s = self.settings
        return {
            "num_perturbations": s.num_perturbations,
            "epsilon": s.epsilon,
            "antithetic": s.antithetic,
            "distribution": s.distribution,
            "seed": s.seed,
            "scope": self.scope,
            "combine": self.combine,
        }

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        conv1d = ctx.adapter.width_layout(kind).conv1d
        with masked(ctx.model, ctx.adapter, ctx.removed):
            stats = input_statistics(ctx, kind, "mini-llm: inputs")
        gates = gate_gradients(ctx, kind, self.settings, self.scope)
        ctx.extras.setdefault("gate_gradients", {})[kind] = gates
        scores = []
        for layer, (stat, gate) in enumerate(zip(stats, gates, strict=True)):
            module, columns = ctx.output_projection(layer, kind)
            weight = output_weight_columns(module, conv1d).detach()
            magnitude = magnitude_activation(weight, stat.norm, columns)
            scores.append(combine(magnitude, gate, self.combine))
        return scores


def magnitude_activation(
    weight: torch.Tensor, norms: torch.Tensor, columns: torch.Tensor
) -> torch.Tensor:
    """M_g = Σ_{j ∈ c(g)} Σ_i |W_ij| · ‖X_j‖ (groups,) from W (out, in) and ‖X‖ (in,)."""
    per_column = weight.abs().to(torch.float64).sum(0).cpu() * norms.to(torch.float64).cpu()
    return columns_per_group(per_column, columns)


def combine(magnitude: torch.Tensor, gate: torch.Tensor, how: str = "paper") -> torch.Tensor:
    """The group score: M_g · |â_g| (the paper's product), or |â_g| alone (``"gate"``)."""
    return gate.abs() if how == "gate" else magnitude * gate.abs()


def gate_gradients(
    ctx: ScoringContext, kind: str, settings: SPSASettings, scope: str = "model"
) -> list[torch.Tensor]:
    """â per layer (groups,) float64: the estimated ∂L/∂s_g of the mean window loss."""
    projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
    conv1d = ctx.adapter.width_layout(kind).conv1d
    modules = [module for module, _ in projections]
    columns = [cols for _, cols in projections]
    sizes = [output_weight_columns(m, conv1d).shape[1] for m in modules]
    windows = len(ctx.calibration) if ctx.calibration is not None else 0
    if scope == "model":
        generator = torch.Generator().manual_seed(settings.seed)
        with masked(ctx.model, ctx.adapter, ctx.removed):
            return estimate_gates(
                lambda: _model_losses(ctx), modules, columns, sizes, windows, settings, generator,
                ctx.bar,
            )
    return _per_layer(ctx, modules, columns, sizes, windows, settings)


def _model_losses(ctx: ScoringContext) -> torch.Tensor:
    """Per-window losses of one whole-model pass over the calibration windows (in order)."""
    parts = [
        window_losses(ctx.model(input_ids=batch, use_cache=False).logits, batch)
        for batch in ctx.batches()
    ]
    return torch.cat(parts).cpu()


def _per_layer(ctx, modules, columns, sizes, windows, settings) -> list[torch.Tensor]:
    """Layer ℓ's gates perturbed alone, each pass running layers ℓ.. from cached inputs."""
    runner = LayerRunner(ctx.model, ctx.adapter, ctx.calibration, ctx.batch_size)
    runner.capture(ctx.removed)
    gates = []
    for layer in ctx.bar(range(len(modules)), "mini-llm: layers"):

        def run(layer: int = layer) -> torch.Tensor:
            parts = [window_losses(lg, ids) for ids, lg in runner.logits_from(layer, ctx.removed)]
            return torch.cat(parts).cpu()

        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + layer)
        (gate,) = estimate_gates(
            run, [modules[layer]], [columns[layer]], [sizes[layer]], windows, settings, generator
        )
        gates.append(gate)
    return gates
