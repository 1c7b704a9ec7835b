"""Reconstruction after width pruning: re-fit the kept columns of each output projection.

After head groups / MLP channels leave a layer, what remains of its output projection
(o_proj / down_proj / fc2 / c_proj, Linear or GPT-2 Conv1D) is re-solved so that the layer's
output on calibration activations is reproduced as well as a linear map of the kept inputs can:

    [W'; b'] = argmin ‖Z_k [W'; b']ᵀ − Z [W; b]ᵀ‖² + λ‖W' − W_k‖²,    Z = [X, 1]

with X the projection's inputs over calibration tokens (Gram matrices accumulated in float64),
k the kept columns and λ = ``damping`` · mean diag(X_kᵀX_k). The intercept column (a bias)
is used where the projection has a bias or its config flag can add one; with W' fixed to W_k
it is exactly FLAP's mean compensation b' = b + W_r · mean(x_r), so the LS solution is never
worse on the calibration data than either FLAP or plain slicing (the proximal damping keeps
that guarantee: λ pulls towards W_k, which is a feasible point). Shapes are those of the
pruned model, so the checkpoint stays standard.

Data flows sequentially: the calibration batches are embedded once, every decoder layer's
call arguments (masks, rotary tables, ALiBi…) are captured, then layer by layer the cached
hidden states are run through the (partly pruned) layer — prune + re-fit its attention, then
its MLP, then compute the next layer's inputs with the pruned layer — so each layer is fitted
on the inputs the already-pruned model gives it. Cost: about three forward passes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.errors import ConfigError
from secateurs.plan import WidthPlan
from secateurs.width import (
    _keep,
    add_output_bias,
    bias_flag_supported,
    output_projection,
    output_weight_columns,
    prune_layer,
)

log = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by a hook once the statistics it needs are gathered (skips the rest)."""


@dataclass
class Gram:
    """Σ zzᵀ over calibration tokens of z = [x, 1] (float64): X's Gram, sums and count."""

    matrix: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        z = x.reshape(-1, x.shape[-1]).to(torch.float64)
        z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
        update = z.T @ z
        self.matrix = update if self.matrix is None else self.matrix + update


@dataclass
class LayerCalls:
    """Cached hidden states (per batch) and every layer's other call arguments."""

    hidden: list[torch.Tensor]
    calls: list[list[tuple[tuple, dict]]]  # calls[layer][batch] = (args after hidden, kwargs)


@dataclass
class Refit:
    """Solved output projection of one layer: new (out, kept) weight, new bias, errors."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_before: float
    error_after: float


# --- capturing layer calls -------------------------------------------------------------------
@torch.no_grad()
def capture_calls(
    model: PreTrainedModel, adapter: Adapter, batches: Sequence[torch.Tensor]
) -> LayerCalls:
    """One forward per batch, recording each decoder layer's arguments (not its hidden state)."""
    layers = adapter.layers(model)
    hidden: list[torch.Tensor] = []
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in layers]

    def make_hook(index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            h, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
            if index == 0:
                hidden.append(h.detach())
            calls[index].append((rest, kwargs))

        return hook

    handles = [
        m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in enumerate(layers)
    ]
    try:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return LayerCalls(hidden, calls)


def run_layer(layer: nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def gram_of_inputs(
    layer: nn.Module, module: nn.Module, cache: LayerCalls, index: int
) -> torch.Tensor:
    """Σ zzᵀ of ``module``'s inputs when ``layer`` runs on the cached hidden states."""
    gram = Gram()

    def hook(mod: nn.Module, args: tuple) -> None:
        gram.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for hidden, call in zip(cache.hidden, cache.calls[index], strict=True):
            with contextlib.suppress(_Stop):
                run_layer(layer, hidden, call)
    finally:
        handle.remove()
    if gram.matrix is None:
        raise ConfigError(f"Layer {index}: its output projection never ran on calibration data.")
    return gram.matrix


# --- the least-squares fit --------------------------------------------------------------------
def refit(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    gram: torch.Tensor,
    kept: torch.Tensor,
    damping: float,
    intercept: bool,
) -> Refit:
    """Solve the damped LS of the module docstring for kept columns ``kept`` (sorted).

    ``weight`` is (out, in) float64, ``gram`` the (in+1)² Gram of [x, 1].
    """
    n_in = weight.shape[1]
    full = torch.cat([weight, _bias_column(weight, bias)], dim=1)  # (out, in+1)
    rows = torch.cat([kept, torch.tensor([n_in])]) if intercept else kept
    a = gram[rows][:, rows].clone()
    b = gram[rows] @ full.T  # (k', out)
    k = len(kept)
    lam = damping * a.diagonal()[:k].mean().clamp_min(1e-12)
    a[:k, :k] += lam * torch.eye(k, dtype=a.dtype)
    b[:k] += lam * weight[:, kept].T
    solution = _solve(a, b)
    new_full = torch.zeros_like(full)
    new_full[:, rows] = solution.T
    if not intercept:
        new_full[:, n_in] = full[:, n_in]
    before = full.clone()
    before[:, _removed(n_in, kept)] = 0
    total = _quadratic(full, gram).clamp_min(1e-30)
    return Refit(
        new_full[:, kept],
        new_full[:, n_in] if bias is not None or intercept else None,
        float(_quadratic(before - full, gram) / total),
        float(_quadratic(new_full - full, gram) / total),
    )


def _bias_column(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is None:
        return weight.new_zeros(weight.shape[0], 1)
    return bias.detach().to(weight)[:, None]


def _removed(n_in: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n_in, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten()


def _quadratic(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖z_t Δᵀ‖² = tr(Δ G Δᵀ): the output error of weight change Δ over the tokens."""
    return ((delta @ gram) * delta).sum()


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a⁻¹b; the minimum-norm least-squares solution where ``a`` is singular (no damping)."""
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, factor)
    return torch.linalg.pinv(a, hermitian=True) @ b


# --- driving it through the model -------------------------------------------------------------
@dataclass
class ReconstructionReport:
    """What reconstruction did, for ``secateurs.json``."""

    damping: float
    intercept: dict[str, bool]
    tokens: int
    layers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "damped least squares of the kept output-projection columns, sequential",
            "damping": self.damping,
            "intercept": self.intercept,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "layers": self.layers,
        }


def can_add_intercept(model: PreTrainedModel, adapter: Adapter, kind: str) -> bool:
    """Whether ``kind``'s output projection has, or its config flag can add, a bias."""
    module, _ = output_projection(model, adapter, 0, kind)
    flag = adapter.width_layout(kind).bias_flag
    return module.bias is not None or bias_flag_supported(model.config, flag)


@torch.no_grad()
def prune_and_reconstruct(
    model: PreTrainedModel,
    adapter: Adapter,
    plan: WidthPlan,
    batches: Sequence[torch.Tensor],
    damping: float = 0.01,
    intercept: bool = True,
    progress: Any = None,
) -> ReconstructionReport:
    """Apply ``plan`` layer by layer, re-fitting each pruned output projection (in place).

    ``intercept``: also fit a bias where one exists or can be added (False: keep biases).
    The config is not updated here (``width.update_config`` does it once at the end).
    """
    if damping < 0:
        raise ConfigError(f"Reconstruction damping must be ≥ 0, got {damping}.")
    start = time.perf_counter()
    kinds = [k for k in ("heads", "channels") if any(plan.removed(k))]
    fits = {k: intercept and can_add_intercept(model, adapter, k) for k in kinds}
    for kind in kinds:
        if fits[kind]:
            add_output_bias(model, adapter, kind)
    cache = capture_calls(model, adapter, batches)
    tokens = sum(h.shape[0] * h.shape[1] for h in cache.hidden)
    report = ReconstructionReport(damping, fits, tokens)
    layers = adapter.layers(model)
    steps = range(len(layers)) if progress is None else progress(range(len(layers)))
    for index in steps:
        for kind in kinds:
            units = plan.removed(kind)[index]
            if units:
                report.layers.append(
                    _prune_layer(model, adapter, index, kind, units, cache, damping, fits[kind])
                )
        if index + 1 < len(layers):
            cache.hidden = [
                run_layer(layers[index], h, call)
                for h, call in zip(cache.hidden, cache.calls[index], strict=True)
            ]
    report.seconds = time.perf_counter() - start
    return report


def _prune_layer(model, adapter, index, kind, units, cache, damping, intercept) -> dict:
    """Prune ``units`` of ``kind`` from layer ``index`` and re-fit its output projection."""
    layer = adapter.layers(model)[index]
    conv1d = adapter.width_layout(kind).conv1d
    module, columns = output_projection(model, adapter, index, kind)
    gram = gram_of_inputs(layer, module, cache, index)
    weight = output_weight_columns(module, conv1d).detach().to(torch.float64)
    bias = None if module.bias is None else module.bias.detach().to(torch.float64)
    kept = columns[_keep(len(columns), units)].flatten().sort().values
    fit = refit(weight, bias, gram, kept, damping, intercept)
    prune_layer(model, adapter, index, kind, units)
    module, _ = output_projection(model, adapter, index, kind)
    _write(module, fit, conv1d)
    return {
        "layer": index,
        "kind": kind,
        "kept_columns": len(kept),
        "relative_error_sliced": round(fit.error_before, 6),
        "relative_error_reconstructed": round(fit.error_after, 6),
    }


def _write(module: nn.Module, fit: Refit, conv1d: bool) -> None:
    weight = fit.weight.T if conv1d else fit.weight
    module.weight.copy_(weight.to(module.weight.dtype))
    if fit.bias is not None and module.bias is not None:
        module.bias.copy_(fit.bias.to(module.bias.dtype))
