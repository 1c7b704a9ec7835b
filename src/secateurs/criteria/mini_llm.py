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
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.criteria.zeroth_order import (
    GateSet,
    SPSASettings,
    estimate_gates,
    prior_scales,
    window_losses,
)
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
        num_perturbations: int = 1,
        epsilon: float = 1e-2,
        antithetic: bool = False,
        distribution: str = "rademacher",
        seed: int = 0,
        scope: str = "layer",
        combine: str = "paper",
        prior_power: float = 1.0,
        layers_per_pass: int = 3,
    ) -> None:
        self.settings = SPSASettings(
            int(num_perturbations), float(epsilon), antithetic, distribution, int(seed)
        )
        if scope not in SCOPES:
            raise ConfigError(f"mini-llm: unknown scope {scope!r}; expected one of {SCOPES}.")
        if combine not in COMBINATIONS:
            raise ConfigError(
                f"mini-llm: unknown combine {combine!r}; expected one of {COMBINATIONS}."
            )
        if int(layers_per_pass) < 1:
            raise ConfigError(f"mini-llm: layers_per_pass must be ≥ 1, got {layers_per_pass}.")
        self.scope, self.combine, self.prior_power = scope, combine, float(prior_power)
        self.layers_per_pass = int(layers_per_pass)

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
            "prior_power": self.prior_power,
            "layers_per_pass": self.layers_per_pass,
        }

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        # M_g = Σ_{j ∈ c(g)} Σ_i |W_ij| · ‖X_j‖: exactly the `activation` criterion (Wanda)
        magnitudes = CRITERIA.get("activation")().score_width(ctx, kind)
        gates = gate_gradients(
            ctx, kind, self.settings, self.scope, magnitudes, self.prior_power, self.layers_per_pass
        )
        ctx.extras.setdefault("gate_gradients", {})[kind] = [g.tolist() for g in gates]  # saved
        return [combine(m, g, self.combine) for m, g in zip(magnitudes, gates, strict=True)]


def combine(magnitude: torch.Tensor, gate: torch.Tensor, how: str = "paper") -> torch.Tensor:
    """The group score: M_g · |â_g| (the paper's product), or |â_g| alone (``"gate"``)."""
    return gate.abs() if how == "gate" else magnitude * gate.abs()


def gate_gradients(
    ctx: ScoringContext,
    kind: str,
    settings: SPSASettings,
    scope: str = "model",
    priors: list[torch.Tensor] | None = None,
    prior_power: float = 0.0,
    layers_per_pass: int = 1,
) -> list[torch.Tensor]:
    """â per layer (groups,) float64: the estimated ∂L/∂s_g of the mean window loss.

    ``priors`` (per layer, (groups,), e.g. M) shape the directions (``prior_scales``);
    ``layers_per_pass``: with ``scope="layer"``, how many (interleaved) layers share a pass.
    """
    if ctx.calibration is None:
        raise ConfigError("mini-llm needs calibration data.")
    if scope not in SCOPES:
        raise ConfigError(f"mini-llm: unknown scope {scope!r}; expected one of {SCOPES}.")
    gates = gate_set(ctx, kind, priors, prior_power)
    shape = tuple(ctx.calibration.shape)
    with masked(ctx.model, ctx.adapter, ctx.removed):
        base = None if settings.antithetic else _model_losses(ctx)
        if scope == "model":
            generator = torch.Generator().manual_seed(settings.seed)
            run = lambda: _model_losses(ctx)  # noqa: E731
            return estimate_gates(run, gates, shape, settings, generator, ctx.bar, base)
    return _per_layer(ctx, gates, shape, settings, base, layers_per_pass)


def gate_set(
    ctx: ScoringContext, kind: str, priors: list[torch.Tensor] | None, prior_power: float
) -> GateSet:
    """Every layer's output projection, its groups' columns and direction scales."""
    conv1d = ctx.adapter.width_layout(kind).conv1d
    projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
    modules = tuple(module for module, _ in projections)
    columns = tuple(cols for _, cols in projections)
    sizes = tuple(output_weight_columns(m, conv1d).shape[1] for m in modules)
    if priors is None or prior_power == 0:
        scales = tuple(torch.ones(c.shape[0]) for c in columns)
    else:
        scales = tuple(prior_scales(priors, prior_power))
    return GateSet(modules, columns, sizes, scales)


def _model_losses(ctx: ScoringContext) -> torch.Tensor:
    """Per-window losses of one whole-model pass over the calibration windows (in order)."""
    parts = [
        window_losses(ctx.model(input_ids=batch, use_cache=False).logits, batch)
        for batch in ctx.batches()
    ]
    return torch.cat(parts).cpu()


def _per_layer(ctx, gates: GateSet, shape, settings, base, per_pass: int) -> list[torch.Tensor]:
    """Layer ℓ's gates perturbed with those of ``per_pass`` − 1 later layers (interleaved), each
    pass running layers ℓ.. from cached inputs; the unperturbed losses (one-sided differences)
    are the same for every layer."""
    passes = layer_passes(len(gates.modules), per_pass)
    runner = LayerRunner(ctx.model, ctx.adapter, ctx.calibration, ctx.batch_size)
    runner.capture(ctx.removed, stop=len(passes))  # passes start at layers 0..len(passes)-1
    out: list[torch.Tensor | None] = [None] * len(gates.modules)
    for layers in ctx.bar(passes, "mini-llm: layers"):

        def run(start: int = layers[0]) -> torch.Tensor:
            parts = [window_losses(lg, ids) for ids, lg in runner.logits_from(start, ctx.removed)]
            return torch.cat(parts).cpu()

        generator = layer_generator(settings.seed, layers[0])
        picked = gates.pick(layers)
        for layer, gate in zip(
            layers, estimate_gates(run, picked, shape, settings, generator, base=base), strict=True
        ):
            out[layer] = gate
    return out


def layer_passes(num_layers: int, per_pass: int) -> list[list[int]]:
    """Layers perturbed together: ℓ, ℓ + s, ℓ + 2s, … with s = ⌈L / per_pass⌉, ℓ < s."""
    stride = -(-num_layers // per_pass)
    return [list(range(first, num_layers, stride)) for first in range(stride)]


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The directions of the pass starting at layer ℓ (``scope="layer"``): a stream of its own."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)
