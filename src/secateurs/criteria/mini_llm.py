"""``mini-llm``: magnitude × activation × forward-only gradient (MINI-LLM, Cheng et al. 2024).

MINI-LLM scores a structure by |W| · ‖X‖ · |G|, with the gradient G estimated from forward
passes only, so that pruning needs the memory of inference. We estimate the gradient where it
decides the pruning: one gate per width group g (head group / channel) scaling g's input columns
of the layer's output projection W (o_proj / down_proj). Per group:

    score_g = M_g · |â_g|,     M_g = Σ_{j ∈ c(g)} Σ_i |W_ij| · ‖X_j‖₂,     â_g ≈ ∂L/∂s_g

(``combine="gate"``: |â_g| alone, the group-level first-order Taylor estimate). â comes from
SPSA with one direction per calibration window (``zeroth_order``); ``scope="model"`` perturbs
every layer's gates in the same passes over the whole model, ``scope="layer"`` one layer at a
time (with ``layers_per_pass`` − 1 interleaved later ones), running only layers ℓ... No
``backward()``. The perturbed models are handed to ``ctx.flow.losses``: in
memory they run one after the other from cached layer inputs; layer by layer from disk
(``the layer-by-layer flow``) their streams advance in lockstep, each layer loaded once — the same
directions and the same estimator, so the same scores.
"""

from __future__ import annotations

import logging
import math

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext
from secateurs.criteria.zeroth_order import (
    GateEstimate,
    GateSet,
    SPSASettings,
    draw_directions,
    gate_estimates,
    prior_scales,
    signal_to_noise,
    signed_steps,
    spsa_perturbations,
)
from secateurs.edits import Perturbation
from secateurs.errors import ConfigError
from secateurs.units.width import output_weight_columns

log = logging.getLogger(__name__)

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

    def streams(self, num_layers: int) -> int:
        return self.stream_count(num_layers)

    def stream_count(self, num_layers: int) -> int:
        """Perturbed models scored at once (the streams the flow holds)."""
        passes = 1 if self.scope == "model" else len(layer_passes(num_layers, self.layers_per_pass))
        return passes * self.settings.num_perturbations * len(signed_steps(self.settings))

    @torch.no_grad()
    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        # M_g = Σ_{j ∈ c(g)} Σ_i |W_ij| · ‖X_j‖: exactly the `activation` criterion (Wanda)
        magnitudes = CRITERIA.get("activation")().score_width(ctx, kind)
        estimates = gate_gradients(
            ctx, kind, self.settings, self.scope, magnitudes, self.prior_power, self.layers_per_pass
        )
        gates = [e.mean for e in estimates]
        ratios = [signal_to_noise(e) for e in estimates]
        ctx.extras.setdefault("gate_gradients", {})[kind] = [g.tolist() for g in gates]  # saved
        ctx.extras.setdefault("gate_signal_to_noise", {})[kind] = [_finite(r) for r in ratios]
        warn_if_noise(kind, ratios)
        return [combine(m, g, self.combine) for m, g in zip(magnitudes, gates, strict=True)]


def warn_if_noise(kind: str, ratios: list[float]) -> None:
    """Say so when most layers' â are noise-dominated (signal-to-noise < 1): the scores then
    rank |W|·‖X‖ times noise, and only more samples help."""
    noisy = sum(1 for r in ratios if r < 1)
    if noisy * 2 > len(ratios):
        log.warning(
            "mini-llm (%s): the forward-only gate gradients are noise-dominated in %d of %d "
            "layers (estimated signal-to-noise < 1; saved as gate_signal_to_noise): the "
            "ranking is mostly |W|·‖X‖ times noise. More calibration windows reduce the noise "
            "(more num_perturbations only down to the windows' own spread); on SmolLM2-135M at "
            "the defaults it is 9× (head groups) to 4,500× (channels) the signal "
            "(docs/criteria.md). Prefer 'fluctuation', 'hywia' or 'influence' where a backward "
            "pass fits in memory.",
            kind,
            noisy,
            len(ratios),
        )


def _finite(value: float) -> float | None:
    """JSON-safe: NaN (cannot tell) and ∞ (no noise) as None."""
    return value if math.isfinite(value) else None


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
) -> list[GateEstimate]:
    """â per layer: the estimated ∂L/∂s_g of the mean window loss (groups,) float64, with its
    variance (``GateEstimate``).

    ``priors`` (per layer, (groups,), e.g. M) shape the directions (``prior_scales``);
    ``layers_per_pass``: with ``scope="layer"``, how many (interleaved) layers share a pass.
    """
    if ctx.calibration is None:
        raise ConfigError("mini-llm needs calibration data.")
    if scope not in SCOPES:
        raise ConfigError(f"mini-llm: unknown scope {scope!r}; expected one of {SCOPES}.")
    gates = gate_set(ctx, kind, priors, prior_power)
    windows, length = ctx.calibration.shape
    passes = spsa_passes(gates, scope, windows, settings, layers_per_pass)
    base = [] if settings.antithetic else [Perturbation(0)]  # shared by every pass
    runs = [
        spsa_perturbations(
            picked, kind, draws, settings, picked.layers[0] if scope == "layer" else 0, length
        )
        for picked, draws in passes
    ]
    ctx.flow.set_base(ctx.removed)
    losses = ctx.flow.losses(base + [p for r in runs for p in r])
    unperturbed, losses = (losses[0] if base else None), losses[len(base) :]
    out: list[GateEstimate] = [GateEstimate(torch.empty(0), torch.empty(0))] * len(gates.layers)
    per_pass = settings.num_perturbations * len(signed_steps(settings))
    for i, (picked, draws) in enumerate(passes):
        pass_losses = losses[i * per_pass : (i + 1) * per_pass]
        for layer, gate in zip(
            picked.layers,
            gate_estimates(pass_losses, unperturbed, picked, draws, settings),
            strict=True,
        ):
            out[layer] = gate
    return out


def spsa_passes(
    gates: GateSet, scope: str, windows: int, settings: SPSASettings, per_pass: int
) -> list[tuple[GateSet, list[list[torch.Tensor]]]]:
    """The gates perturbed together and their directions: all layers from one stream seeded by
    ``seed`` (``scope="model"``), or ``layer_passes``, each from a stream of its own."""
    if scope == "model":
        generator = torch.Generator().manual_seed(settings.seed)
        return [(gates, draw_directions(gates, windows, settings, generator))]
    passes = []
    for layers in layer_passes(len(gates.layers), per_pass):
        picked = gates.pick(layers)
        generator = layer_generator(settings.seed, layers[0])
        passes.append((picked, draw_directions(picked, windows, settings, generator)))
    return passes


def gate_set(
    ctx: ScoringContext, kind: str, priors: list[torch.Tensor] | None, prior_power: float
) -> GateSet:
    """Every layer's output projection's groups' columns, sizes and direction scales."""
    conv1d = ctx.adapter.width_layout(kind).conv1d
    projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
    columns = tuple(cols for _, cols in projections)
    sizes = tuple(output_weight_columns(m, conv1d).shape[1] for m, _ in projections)
    if priors is None or prior_power == 0:
        scales = tuple(torch.ones(c.shape[0]) for c in columns)
    else:
        scales = tuple(prior_scales(priors, prior_power))
    return GateSet(tuple(range(len(columns))), columns, sizes, scales)


def layer_passes(num_layers: int, per_pass: int) -> list[list[int]]:
    """Layers perturbed together: ℓ, ℓ + s, ℓ + 2s, … with s = ⌈L / per_pass⌉, ℓ < s."""
    stride = -(-num_layers // per_pass)
    return [list(range(first, num_layers, stride)) for first in range(stride)]


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The directions of the pass starting at layer ℓ (``scope="layer"``): a stream of its own."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)
