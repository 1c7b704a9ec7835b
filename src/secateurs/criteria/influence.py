"""``influence``: influence-function estimate of the loss change after removal *and the
compensation we apply* (IFSO, made consistent with ``secateurs.reconstruct``).

For a layer's output projection Ŵ = [W, b] (out × in+1; o_proj / down_proj) acting on
z = [x, 1] and a width group g owning input columns c(g), removing g sets W[:, c] = 0, and
reconstruction re-fits the kept columns (and the bias, where it has an intercept) by damped
least squares on calibration inputs. With A = E[z zᵀ] (damped: A_λ = A + λ·mean(diag A_x)·I on
the x block) that re-fit is the Optimal-Brain-Surgeon update

    ΔŴ = −W_c · [(A_λ⁻¹)_cc]⁻¹ · (A_λ⁻¹)_c,:

and — because the Kronecker-factored Gauss-Newton H ≈ A ⊗ S (S = E[e eᵀ], e = ∂ℓ_t/∂y_t the
per-token output gradient) constrains only columns — it is also the update that minimises the
quadratic loss model, whatever S. The predicted loss change of the model we produce is then

    ΔL_g = ⟨G, ΔŴ⟩ + ½ · tr( S · W_c · [(A_λ⁻¹)_cc]⁻¹ · W_cᵀ ),     G = E[e zᵀ] = ∂L/∂Ŵ

(``first_order=True`` keeps ⟨G, ΔŴ⟩; the default drops it, as IFSO does assuming a
minimum: on the calibration data it predicts the measured loss change almost perfectly, but
G from a few calibration windows does not generalise — at LLM-Pruner's configuration on
SmolLM2 with reconstruction, WikiText-2 / PTB PPL 274.8 / 271.4 with it, 168.5 / 184.3
without, first 64 windows). ΔL is in units of
the calibration loss, so scores are comparable across layers and kinds; it can be negative
(removal predicted to help). ``intercept=None`` fits a bias exactly where reconstruction would
(the projection has one or its config flag can add one); λ = ``damping`` as reconstruction's.

Cost: one backward pass per calibration batch (for S and G), one (in+1)² inverse per layer and
one |c|×|c| inverse per group (|c| = 1 for channels; heads × head_dim for a KV group). Memory:
A ((in+1)²), S (out²) and G per layer, float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, calibration_loss
from secateurs.errors import ConfigError
from secateurs.units.depth import masked
from secateurs.units.width import can_add_intercept, output_weight_columns

log = logging.getLogger(__name__)


@dataclass
class _Curvature:
    inputs: torch.Tensor  # Σ z zᵀ, z = [x, 1]  (in+1, in+1)
    outputs: torch.Tensor  # Σ e eᵀ (out, out)
    gradient: torch.Tensor  # Σ e zᵀ (out, in+1)
    tokens: int = 0


@CRITERIA.register("influence", aliases=("ifso",))
class Influence(Criterion):
    name = "influence"
    uses_backward = True
    loss_scores = True  # ΔL of the compensated model, in calibration-loss units
    assumes_reconstruction = True
    units = frozenset({"heads", "channels"})
    summary = "predicted loss change ⟨G,ΔŴ⟩ + ½tr(S·W_c[(A⁻¹)_cc]⁻¹W_cᵀ) after the LS re-fit"

    def __init__(
        self, damping: float = 0.01, first_order: bool = False, intercept: bool | None = None
    ) -> None:
        if not damping >= 0:
            raise ConfigError(f"influence: damping must be ≥ 0, got {damping}.")
        self.damping, self.first_order = float(damping), bool(first_order)
        self.intercept = intercept

    def options(self) -> dict[str, object]:
        return {
            "damping": self.damping,
            "first_order": self.first_order,
            "intercept": self.intercept,
        }

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        conv1d = ctx.adapter.width_layout(kind).conv1d
        projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
        curvature = kfac_factors(ctx, [m for m, _ in projections])
        intercept = self.intercept
        if intercept is None:
            intercept = can_add_intercept(ctx.model, ctx.adapter, kind)
        _warn_if_underdetermined(curvature, kind)
        scores = []
        for (module, columns), f in zip(projections, curvature, strict=True):
            weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
            a, s, g = (m.to(torch.float64) / f.tokens for m in (f.inputs, f.outputs, f.gradient))
            if not intercept:
                a, g = a[:-1, :-1], g[:, :-1]
            g = g if self.first_order else None
            change = removal_loss_change(weight, columns, a, s, self.damping, g)
            scores.append(change.cpu())
        return scores


def _warn_if_underdetermined(curvature: list[_Curvature], kind: str) -> None:
    # With fewer tokens than inputs, any column is reproduced in-sample by the others, so the
    # predicted compensation is over-optimistic (damping alone decides the scores).
    tokens, inputs = curvature[0].tokens, curvature[0].inputs.shape[0]
    if tokens < 2 * inputs:
        log.warning(
            "influence (%s): %d calibration tokens for %d inputs per projection; the predicted "
            "re-fit is optimistic below ~2x as many tokens (use more calibration samples)",
            kind,
            tokens,
            inputs,
        )


def removal_loss_change(
    weight: torch.Tensor,
    columns: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    damping: float,
    gradient: torch.Tensor | None = None,
) -> torch.Tensor:
    """ΔL_g = ⟨G, ΔŴ_g⟩ + ½ tr(S W_c [(A_λ⁻¹)_cc]⁻¹ W_cᵀ) for every group's columns c.

    ``weight`` is (out, in), ``a`` the (in, in) input second moment, or (in+1, in+1) with a
    trailing constant input (an intercept: its column is free, undamped), ``s`` (out, out) the
    output-gradient second moment, ``gradient`` (out, len(a)) ∂L/∂Ŵ (None: no first-order
    term). The second term is the minimum over compensations ΔŴ of the remaining columns of
    ½ tr(S ΔŴ A_λ ΔŴᵀ) subject to ΔŴ[:, c] = −W[:, c]; ΔŴ_g is that minimiser.
    """
    n_in = weight.shape[1]
    a_inv = torch.linalg.inv(_damped(a, n_in, damping))
    sw = s @ weight  # (out, in)
    projected = None if gradient is None else a_inv[:n_in] @ gradient.T  # (in, out)
    if columns.shape[1] == 1:  # one column per group: [(A⁻¹)_jj]⁻¹ is a scalar
        cols = columns[:, 0]
        pivot = a_inv.diagonal()[cols]
        change = 0.5 * (sw[:, cols] * weight[:, cols]).sum(0) / pivot
        if projected is not None:
            change = change - (weight[:, cols] * projected[cols].T).sum(0) / pivot
        return change
    changes = []
    for cols in columns:
        block = torch.linalg.inv(a_inv[cols][:, cols])
        change = 0.5 * ((sw[:, cols] @ block) * weight[:, cols]).sum()
        if projected is not None:
            change = change - ((weight[:, cols] @ block) * projected[cols].T).sum()
        changes.append(change)
    return torch.stack(changes)


def _damped(a: torch.Tensor, n_in: int, damping: float) -> torch.Tensor:
    """A + λ·mean(diag A_x)·I on the input block (a trailing intercept stays undamped)."""
    diag = torch.zeros(len(a), dtype=a.dtype, device=a.device)
    diag[:n_in] = damping * a.diagonal()[:n_in].mean()
    return a + torch.diag(diag)


def kfac_factors(ctx: ScoringContext, modules: list[torch.nn.Module]) -> list[_Curvature]:
    """Σ zzᵀ of each module's inputs z = [x, 1], Σ eeᵀ of its per-token output gradients e,
    and Σ ezᵀ (the gradient of the summed per-token losses)."""
    factors: list[_Curvature | None] = [None] * len(modules)
    handles = []

    def forward_hook(index: int):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            z = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
            if factors[index] is None:
                n_out = output.shape[-1]
                factors[index] = _Curvature(
                    torch.zeros(z.shape[1], z.shape[1]),
                    torch.zeros(n_out, n_out),
                    torch.zeros(n_out, z.shape[1]),
                )
            factors[index].inputs += z.T @ z
            factors[index].tokens += z.shape[0]
            if output.requires_grad:
                output.register_hook(lambda g: _add_outputs(factors[index], g, z))

        return hook

    model = ctx.model
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for index, module in enumerate(modules):
            module.weight.requires_grad_(True)  # makes the outputs part of the graph
            handles.append(module.register_forward_hook(forward_hook(index)))
        with masked(model, ctx.adapter, ctx.removed):
            for batch in ctx.bar(ctx.batches(), "influence: curvature"):
                loss = calibration_loss(model, batch)
                loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return factors


def _add_outputs(factors: _Curvature, grad: torch.Tensor, z: torch.Tensor) -> None:
    # The loss is a mean over the batch's predicted tokens: scale back to per-token gradients.
    tokens = grad.shape[0] * (grad.shape[1] - 1) if grad.dim() == 3 else grad.shape[0]
    e = grad.detach().reshape(-1, grad.shape[-1]).float() * tokens
    factors.outputs += e.T @ e
    factors.gradient += e.T @ z
