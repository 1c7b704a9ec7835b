"""``influence``: influence-function estimate of the loss change after removal *and retraining*
(in the spirit of IFSO).

For a layer's output projection W (out × in; o_proj / down_proj) and a width group g owning
its input columns c(g), removing g sets W[:, c] = 0. Under a quadratic model of the loss with
the Kronecker-factored Gauss-Newton/Fisher H ≈ A ⊗ S (A = E[x xᵀ], the input covariance;
S = E[e eᵀ], the covariance of per-token output gradients e = ∂ℓ_t/∂y_t), re-optimising the
*remaining* columns to compensate (the influence of the constraint on the optimum, as in
Optimal Brain Surgeon) changes the loss by

    ΔL_g = ½ · tr( S · W_c · [(A_λ⁻¹)_cc]⁻¹ · W_cᵀ ),      A_λ = A + λ·mean(diag A)·I

(λ = ``damping``). ΔL is in units of the calibration loss, so scores are comparable across
layers and kinds: global ranking needs no per-layer normalisation. The estimate assumes the
model sits near a minimum of the calibration loss (the first-order term is dropped, as IFSO
does after its influence approximation).

Cost: one backward pass per calibration batch (for S), one in×in inverse per layer and one
|c|×|c| inverse per group (|c| = 1 for channels; heads × head_dim for a KV group). Memory:
A (in²) and S (out²) per layer, float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.base import Criterion, ScoringContext, calibration_loss
from secateurs.errors import ConfigError
from secateurs.units import masked
from secateurs.width import output_weight_columns


@dataclass
class _Curvature:
    inputs: torch.Tensor  # Σ x xᵀ  (in, in)
    outputs: torch.Tensor  # Σ e eᵀ (out, out)
    tokens: int = 0


@CRITERIA.register("influence", aliases=("ifso",))
class Influence(Criterion):
    name = "influence"
    uses_backward = True
    units = frozenset({"heads", "channels"})
    summary = (
        "OBS/influence estimate ½tr(S·W_c[(A⁻¹)_cc]⁻¹W_cᵀ) of the loss change after retraining"
    )

    def __init__(self, damping: float = 0.01) -> None:
        if not damping > 0:
            raise ConfigError(f"influence: damping must be positive, got {damping}.")
        self.damping = float(damping)

    def options(self) -> dict[str, float]:
        return {"damping": self.damping}

    def score_width(self, ctx: ScoringContext, kind: str) -> list[torch.Tensor]:
        conv1d = ctx.adapter.width_layout(kind).conv1d
        projections = [ctx.output_projection(layer, kind) for layer in range(ctx.num_layers())]
        curvature = kfac_factors(ctx, [m for m, _ in projections])
        scores = []
        for (module, columns), f in zip(projections, curvature, strict=True):
            weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
            inputs, outputs = (m.to(torch.float64) / f.tokens for m in (f.inputs, f.outputs))
            scores.append(removal_loss_change(weight, columns, inputs, outputs, self.damping).cpu())
        return scores


def removal_loss_change(
    weight: torch.Tensor, columns: torch.Tensor, a: torch.Tensor, s: torch.Tensor, damping: float
) -> torch.Tensor:
    """ΔL_g = ½ tr(S W_c [(A_λ⁻¹)_cc]⁻¹ W_cᵀ) for every group's columns c (rows of ``columns``).

    ``weight`` is (out, in), ``a`` (in, in) the input second moment, ``s`` (out, out) the output
    gradient second moment. This is the minimum over compensations ΔW of the remaining columns
    of ½ tr(S ΔW A_λ ΔWᵀ) subject to ΔW[:, c] = −W[:, c].
    """
    eye = torch.eye(len(a), dtype=a.dtype, device=a.device)
    a_inv = torch.linalg.inv(a + damping * a.diagonal().mean() * eye)
    sw = s @ weight  # (out, in)
    if columns.shape[1] == 1:  # one column per group: [(A⁻¹)_jj]⁻¹ is a scalar
        cols = columns[:, 0]
        return 0.5 * (sw[:, cols] * weight[:, cols]).sum(0) / a_inv.diagonal()[cols]
    changes = []
    for cols in columns:
        block = torch.linalg.inv(a_inv[cols][:, cols])
        changes.append(0.5 * ((sw[:, cols] @ block) * weight[:, cols]).sum())
    return torch.stack(changes)


def kfac_factors(ctx: ScoringContext, modules: list[torch.nn.Module]) -> list[_Curvature]:
    """Σ x xᵀ of each module's input and Σ e eᵀ of its per-token output gradients."""
    factors = [None] * len(modules)
    handles = []

    def forward_hook(index: int):
        def hook(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if factors[index] is None:
                factors[index] = _Curvature(
                    torch.zeros(x.shape[1], x.shape[1]),
                    torch.zeros(output.shape[-1], output.shape[-1]),
                )
            factors[index].inputs += x.T @ x
            factors[index].tokens += x.shape[0]
            if output.requires_grad:
                output.register_hook(lambda g: _add_outputs(factors[index], g))

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


def _add_outputs(factors: _Curvature, grad: torch.Tensor) -> None:
    # The loss is a mean over the batch's predicted tokens: scale back to per-token gradients.
    tokens = grad.shape[0] * (grad.shape[1] - 1) if grad.dim() == 3 else grad.shape[0]
    e = grad.detach().reshape(-1, grad.shape[-1]).float() * tokens
    factors.outputs += e.T @ e
