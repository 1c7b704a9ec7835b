"""Reconstruction after width pruning: re-fit the kept columns of each output projection.

After head groups / MLP channels leave a layer, what remains of its output projection
(o_proj / down_proj / fc2 / c_proj, Linear or GPT-2 Conv1D) is re-solved so that the layer's
output on calibration activations is reproduced as well as a linear map of the kept inputs can:

    [W'; b'] = argmin ‖Z_k [W'; b']ᵀ − Z [W; b]ᵀ‖² + λ‖W' − W_k‖²,    Z = [X, 1]

with X the projection's inputs over calibration tokens, k the kept columns and λ = ``damping`` ·
mean diag(X_kᵀX_k). The intercept column (a bias) is used where the projection has a bias or its
config flag can add one; with W' fixed to W_k it is exactly FLAP's mean compensation b' = b +
W_r · mean(x_r), so the LS solution is never worse on the calibration data than either FLAP or
plain slicing (the proximal damping keeps that guarantee: λ pulls towards W_k, which is a
feasible point). Shapes are those of the pruned model, so the checkpoint stays standard. Without
an intercept the bias stays as it is and the fit reproduces W x. Only the normal equations of
the kept columns are accumulated (in float64), never the full Gram, and they are solved in
place: a layer's fit needs (k+1)·(k+1+out) numbers, which keeps the layer-by-layer path within
its memory budget.

Data flows through the one engine (``session.flow``) as the cut walks the layers: each layer is
fitted on the inputs the already-pruned model gives it (prune + re-fit its attention, then its
MLP; the walk then runs the pruned layer to give the next its inputs); a second pass over each
pruned projection's inputs measures the error the fit leaves. Cost: about four forward passes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.errors import ConfigError
from secateurs.plan import Plan
from secateurs.runinfo import return_freed_memory
from secateurs.session.flow import Step
from secateurs.units.width import (
    add_output_bias,
    can_add_intercept,
    keep_index,
    output_projection,
    output_weight_columns,
    prune_layer,
)

log = logging.getLogger(__name__)


@dataclass
class Refit:
    """Solved output projection of one layer: new (out, kept) weight, new bias, errors."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    error_before: float
    error_after: float


# --- the least-squares fit --------------------------------------------------------------------
ROWS_AT_ONCE = 256  # output rows of W handled at a time: float64 copies stay small
TOKENS_AT_ONCE = 256  # input tokens handled at a time: (tokens, in) float64 copies stay small
# Above this size the normal equations (A and B) are held in float32: a 14B MLP keeps ~11k of
# 13.8k channels, whose float64 system alone is 1.4 GB. Every model up to a 3B one (Llama-3.2:
# 0.5 GB) is fitted in float64 as before; the record says which precision each fit used.
FLOAT64_BYTES = 768 * 2**20


class _Fit:
    """What both forms of the fit share: the projection, the kept columns, the errors, and the
    solution ``(kept [+ 1], out)`` that ``measure`` checks and ``result`` hands out."""

    dtype: torch.dtype
    form: str
    measured_in_solve = False  # True: ``solve`` measured the fit's error (no second pass)

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, intercept: bool
    ) -> None:
        self.weight, self.bias, self.intercept = weight, bias, intercept
        self.kept, self.removed = kept, _removed(weight.shape[1], kept)
        self.output_energy = self.sliced_error = self.residual = 0.0
        self.solution: torch.Tensor | None = None
        self.tokens = 0

    def rows(self) -> Iterator[slice]:
        for start in range(0, self.weight.shape[0], ROWS_AT_ONCE):
            yield slice(start, start + ROWS_AT_ONCE)

    def add(self, x: torch.Tensor) -> None:
        for part in _token_chunks(x):
            self._add(part)
            self.tokens += len(part)

    def _add(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _weight_rows(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor | float]:
        w = self.weight[rows].detach().to(torch.float64)
        bias = 0.0 if self.bias is None else self.bias[rows].detach().to(torch.float64)
        return w, bias

    def measure(self, x: torch.Tensor) -> None:
        """Add the fitted map's output error on inputs ``x`` (a second pass, after ``solve``):
        measured, not derived from the normal equations, so it is exact however ill-conditioned
        the system was."""
        if self.measured_in_solve:
            return
        for part in _token_chunks(x):
            self._measure(part)

    def _measure(self, x: torch.Tensor) -> None:
        z = x[:, self.kept]
        k = len(self.kept)
        for rows in self.rows():
            w, bias = self._weight_rows(rows)
            target = x @ w.T
            predicted = z @ self.solution[:k, rows].to(torch.float64)
            if self.intercept:
                predicted += self.solution[k, rows].to(torch.float64) - bias
            self.residual += float((predicted - target).pow(2).sum())

    def result(self) -> Refit:
        k, total = len(self.kept), max(self.output_energy, 1e-30)
        return Refit(
            self.solution[:k].T,
            self.solution[k] if self.intercept else None,
            self.sliced_error / total,
            self.residual / total,
        )


class NormalEquations(_Fit):
    form = "normal equations"

    """The normal equations of the fit, for the kept columns only (with z = [x_kept, 1]):

        A = Σ z zᵀ,   B = Σ z tᵀ,   t = W x (+ b where the intercept is fitted)

    plus the energies the errors need. Nothing of the size of the full Gram (in+1)² is ever
    built: for a 8192-channel MLP that alone would be 0.5 GB in float64.
    ``weight`` is (out, in) as the module computes (Conv1D transposed), ``bias`` or None.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, intercept: bool
    ) -> None:
        super().__init__(weight, bias, kept, intercept)
        size, out = len(kept) + int(intercept), weight.shape[0]
        small = (size * size + size * out) * 8 <= FLOAT64_BYTES
        self.dtype = torch.float64 if small else torch.float32
        # Column-major, as LAPACK works: factorisation and solves then happen truly in place
        # (a row-major matrix is copied first, which at this size is hundreds of MB).
        self.a = torch.zeros(size, size, dtype=self.dtype, device=weight.device).mT
        self.b = torch.zeros(out, size, dtype=self.dtype, device=weight.device).mT

    def _add(self, x: torch.Tensor) -> None:
        z = x[:, self.kept]
        if self.intercept:
            z = torch.cat([z, z.new_ones(len(z), 1)], dim=1)
        self.a.addmm_(z.T.to(self.dtype), z.to(self.dtype))
        removed = x[:, self.removed]
        for rows in self.rows():
            w, bias = self._weight_rows(rows)
            target = x @ w.T
            self.output_energy += float((target + bias).pow(2).sum())
            if self.intercept:
                target += bias
            self.b[:, rows].addmm_(z.T.to(self.dtype), target.to(self.dtype))
            self.sliced_error += float((removed @ w[:, self.removed].T).pow(2).sum())

    def solve(self, damping: float) -> None:
        """The damped LS solution of the module docstring, in ``self.solution``. ``a`` and
        ``b`` are overwritten (Cholesky factor, solution) to keep memory at their size."""
        k = len(self.kept)
        lam = damping * float(self.a.diagonal()[:k].mean().clamp_min(1e-12))
        self.a.diagonal()[:k] += lam
        for rows in self.rows():  # b += λ W_keptᵀ: the pull towards the sliced weights
            self.b[:k, rows] += lam * self.weight[rows][:, self.kept].detach().to(self.dtype).T
        self.solution = _solve_in_place(self.a, self.b, exact=damping == 0)
        self.a = None  # the factor is not needed any more


class TokenSystem(_Fit):
    """The same fit in its dual form, for fewer calibration tokens n than kept columns k (a 14B
    MLP fitted on 1,024 tokens): with W' = W_kept + Δ and r = W_removed x_removed what slicing
    loses, Δ minimises ‖Z Δᵀ − R‖² + λ‖Δ‖², whose solution is Δᵀ = Zᵀ (Z Zᵀ + λI)⁻¹ R: an
    n × n system instead of the normal equations' k × k. The intercept, unpenalised as there, is
    the centring of Z and R (b' = b + r̄ − Δ z̄). It holds Z (n × k) and R (n × out) in float64,
    and the solution in float32 (as the normal equations at this size): at 14B, 0.4 GB where
    the normal equations take 0.7 GB, and a 1k² solve instead of an 11k² one."""

    dtype = torch.float32
    form = "dual (tokens < kept columns)"

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, intercept: bool
    ) -> None:
        super().__init__(weight, bias, kept, intercept)
        self.z: list[torch.Tensor] = []
        self.r: list[torch.Tensor] = []

    def _add(self, x: torch.Tensor) -> None:
        self.z.append(x[:, self.kept])
        removed, lost = x[:, self.removed], []
        for rows in self.rows():
            w, bias = self._weight_rows(rows)
            self.output_energy += float((x @ w.T + bias).pow(2).sum())
            lost.append(removed @ w[:, self.removed].T)
        self.r.append(torch.cat(lost, dim=1))
        self.sliced_error += float(self.r[-1].pow(2).sum())

    def solve(self, damping: float) -> None:
        z, r = torch.cat(self.z), torch.cat(self.r)
        self.z, self.r = [], []  # their pieces go as the whole is built
        lam = damping * float(z.pow(2).sum(0).mean().clamp_min(1e-12))  # mean diag of ZᵀZ
        if self.intercept:
            z_mean, r_mean = z.mean(0), r.mean(0)
            z -= z_mean
            r -= r_mean
        gram = z @ z.T
        gram.diagonal().add_(lam)
        # gram is symmetric: its transpose is the column-major matrix the solver wants
        coefficients = _solve_in_place(gram.mT, r.mT.contiguous().mT, exact=lam == 0)
        k, out = len(self.kept), self.weight.shape[0]
        self.solution = torch.empty(k + int(self.intercept), out, dtype=self.dtype, device=z.device)
        for rows in self.rows():
            delta = z.T @ coefficients[:, rows]  # Δᵀ for these output rows, (k, rows)
            # the error the fit leaves on the very tokens it was fitted on, measured (as the
            # normal equations' second pass, without one): ‖Z Δᵀ − R‖² on the centred data
            self.residual += float((z @ delta - r[:, rows]).pow(2).sum())
            w, bias = self._weight_rows(rows)
            self.solution[:k, rows] = w[:, self.kept].T + delta
            if self.intercept:
                self.solution[k, rows] = bias + r_mean[rows] - z_mean @ delta
        self.measured_in_solve = True


def fit_system(
    weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, intercept: bool,
    tokens: int,
) -> _Fit:  # fmt: skip
    """The normal equations, or their dual form where fewer tokens than kept columns come and
    the normal equations would be large (``FLOAT64_BYTES``): every model up to 3B, and any fit
    with enough tokens, is solved in the primal form as before."""
    size, out = len(kept) + int(intercept), weight.shape[0]
    large = (size * size + size * out) * 8 > FLOAT64_BYTES
    if large and 0 < tokens < size:
        return TokenSystem(weight, bias, kept, intercept)
    return NormalEquations(weight, bias, kept, intercept)


def _token_chunks(x: torch.Tensor) -> Iterator[torch.Tensor]:
    """``x`` as (tokens, in) float64 pieces of ``TOKENS_AT_ONCE`` tokens."""
    flat = x.detach().reshape(-1, x.shape[-1])
    for start in range(0, len(flat), TOKENS_AT_ONCE):
        yield flat[start : start + TOKENS_AT_ONCE].to(torch.float64)


def _removed(n_in: int, kept: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(n_in, dtype=torch.bool)
    mask[kept] = False
    return mask.nonzero().flatten().to(kept.device)


def _solve_in_place(a: torch.Tensor, b: torch.Tensor, exact: bool) -> torch.Tensor:
    """a⁻¹b, overwriting a and b (both column-major). Undamped (``exact``) systems may be
    singular: those fall back to the minimum-norm solution, from a copy kept for that."""
    original = a.clone() if exact else None
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(a, out=(a, info))
    if int(info) == 0:
        torch.linalg.solve_triangular(a, b, upper=False, out=b)
        return torch.linalg.solve_triangular(a.mT, b, upper=True, out=b)
    if original is None:
        raise ConfigError("Reconstruction's system is not positive definite; raise the damping.")
    return torch.linalg.pinv(original, hermitian=True) @ b


def refit(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    kept: torch.Tensor,
    damping: float,
    intercept: bool,
) -> Refit:
    """The fit of ``weight``'s kept columns on inputs ``x`` (tokens, in), in one call."""
    normal = fit_system(weight, bias, kept, intercept, x.reshape(-1, x.shape[-1]).shape[0])
    normal.add(x)
    normal.solve(damping)
    normal.measure(x)
    return normal.result()


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


def prepare_intercepts(
    model: PreTrainedModel, adapter: Adapter, kinds: Sequence[str], intercept: bool
) -> dict[str, bool]:
    """Per pruned kind, whether its fit has an intercept (asked for, and the projection has a
    bias or its config flag can add one); adds the zero biases those fits will fill."""
    fits = {k: intercept and can_add_intercept(model, adapter, k) for k in kinds}
    for kind in kinds:
        if fits[kind]:
            add_output_bias(model, adapter, kind)
    return fits


class Reconstruction:
    """The fit step of the cut: in each layer, prune the plan's head groups / channels and
    re-fit the output projections on the layer's inputs (``Step.hidden``: the already-pruned
    model's activations). Adds the zero biases the intercepts will fill (every layer, at once:
    a lazy model creates them as zeros when a layer loads)."""

    def __init__(self, model: PreTrainedModel, adapter: Adapter, plan: Plan, damping: float,
                 intercept: bool, tokens: int) -> None:  # fmt: skip
        if damping < 0:
            raise ConfigError(f"Reconstruction damping must be ≥ 0, got {damping}.")
        self.model, self.adapter, self.plan, self.damping = model, adapter, plan, damping
        kinds = [k for k in ("heads", "channels") if any(plan.removed(k))]
        self.fits = prepare_intercepts(model, adapter, kinds, intercept)
        self.report = ReconstructionReport(damping, self.fits, tokens)
        self.start = time.perf_counter()
        cut = [i for i in range(plan.num_layers) if any(plan.removed(k)[i] for k in kinds)]
        self.last_layer = max(cut, default=-1)  # the walk need not go further

    @torch.no_grad()
    def layer(self, step: Step) -> None:
        """Prune and re-fit layer ``step.index`` (heads before channels, as in the layer)."""
        for kind, intercept in self.fits.items():
            units = self.plan.removed(kind)[step.index]
            if units:
                self.report.layers.append(self._refit(step, kind, units, intercept))

    def _refit(self, step: Step, kind: str, units: Sequence[int], intercept: bool) -> dict:
        index = step.index
        conv1d = self.adapter.width_layout(kind).conv1d
        module, columns = output_projection(self.model, self.adapter, index, kind)
        kept = columns[keep_index(len(columns), units)].flatten().sort().values
        weight = output_weight_columns(module, conv1d)
        kept = kept.to(weight.device)
        normal = fit_system(weight, module.bias, kept, intercept, self.report.tokens)
        step.run_until(module, normal.add)
        return_freed_memory()  # the pass's temporaries, before the solve needs the room
        normal.solve(self.damping)
        if not normal.measured_in_solve:
            step.run_until(module, normal.measure)
        fit, precision = normal.result(), str(normal.dtype).removeprefix("torch.")
        form = normal.form
        del normal
        prune_layer(self.model, self.adapter, index, kind, units)
        module, _ = output_projection(self.model, self.adapter, index, kind)
        _write(module, fit, conv1d, step.hidden[0].dtype)
        return {
            "layer": index,
            "kind": kind,
            "kept_columns": len(kept),
            "relative_error_sliced": round(fit.error_before, 6),
            "relative_error_reconstructed": round(fit.error_after, 6),
            "precision": precision,
            "form": form,
        }

    def finish(self) -> dict[str, Any]:
        self.report.seconds = time.perf_counter() - self.start
        log.info("reconstruction: %d fits in %.1f s", len(self.report.layers), self.report.seconds)
        return {"enabled": True, **self.report.to_dict()}


def _write(module: nn.Module, fit: Refit, conv1d: bool, compute: torch.dtype) -> None:
    weight = fit.weight.T if conv1d else fit.weight
    if module.weight.dtype == compute:
        module.weight.copy_(weight)  # copy_ converts the dtype without a full-size temporary
    else:  # a 16-bit weight a lazy session holds: the fit stays in the compute dtype, as in
        # memory, so the layers after it see the same inputs in every mode; a float32 fit is
        # the solution's own storage (a transposed view: F.linear reads it as it is), no copy
        module.weight = nn.Parameter(weight.to(compute), requires_grad=False)
    if fit.bias is not None and module.bias is not None:
        module.bias.copy_(fit.bias)
