"""Training-free healing of removed blocks and branches, absorbed into a standard checkpoint.

The residual stream passes through the sublayers attn₀, mlp₀, attn₁, mlp₁, …; a plan removes
some (a block is its two). Each maximal run of removed sublayers is healed into the output
projection of the kept sublayer just before it — the MLP's down_proj, or, when a run starts
with an MLP whose layer keeps its attention, that attention's o_proj — whose output adds
straight into the stream. On calibration windows we record that projection's inputs X
(tokens, m) and the run's contribution D = h_after − h_before (tokens, d): what the removed
sublayers add, computed on the already-pruned stream with them present. Then

    ΔW = argmin ||D − X ΔWᵀ||² + λ||ΔW||²,   λ = damp · mean(diag(XᵀX)),

is added to the projection's weight (ReplaceMe's estimator, arXiv 2505.02819, generalised from
block spans to any run). The checkpoint keeps its shapes and config, so any engine loads it.
Runs are healed in order as the cut walks the layers, each on the already-pruned and healed
model's activations (after the layer's own width cut and re-fit). Because ΔW = 0 is a
candidate, the correction never increases the calibration error ||D − X ΔWᵀ||².

``objective="cosine"`` (ReplaceMe's other estimator) then refines ΔW by Adam to minimise the
mean cosine distance 1 − cos(h_before + X ΔWᵀ, h_before + D) over the tokens, starting from the
least-squares ΔW: the next layer normalises its input, so direction is what it reads. It keeps
the run's X, h_before and D of every fit token in memory (float32).

``target="dense"`` fits D = (the dense model's stream after a run of whole blocks) − h_before
instead: it also corrects the drift earlier removals left in the stream. A run is skipped, and
the record says why, where a linear correction cannot absorb it: no kept projection before it,
a family that normalises branch outputs before the residual add (Gemma 2, OLMo 2, …), or a
branch run in a parallel-residual block (both branches read the block's input).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.defaults import HEAL_OBJECTIVES, HEAL_TARGETS
from secateurs.errors import ConfigError
from secateurs.plan import Plan, Unit
from secateurs.session.flow import Step
from secateurs.units.depth import masked
from secateurs.units.width import add_output_bias, bias_flag_supported

log = logging.getLogger(__name__)

DAMP = 0.01
# --heal-damping auto: candidates, as fractions of the mean diagonal of XᵀX (0 is left out: an
# exactly singular Gram would make it meaningless).
DAMPING_GRID = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
FOLDS = 2
# The cosine refinement: Adam steps, and their size as a fraction of the least-squares ΔW's
# root mean square entry (docs/depth.md has the convergence they were read from).
COSINE_STEPS = 100
COSINE_RATE = 0.05
Sublayer = tuple[int, str]  # (layer, "attn" | "mlp"), in stream order
PROJECTIONS = {"attn": "o_proj", "mlp": "down_proj"}  # what a run heals into, by target kind


def runs_of(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive layer indices."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(blocks):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


@dataclass(frozen=True)
class Run:
    """Consecutive removed sublayers and the kept sublayer before them (``target``)."""

    target: Sublayer | None
    removed: tuple[Sublayer, ...]

    @property
    def whole_blocks(self) -> bool:
        return self.removed[0][1] == "attn" and self.removed[-1][1] == "mlp"

    @property
    def blocks(self) -> list[int]:
        """The layers the run removes whole."""
        layers = sorted({layer for layer, _ in self.removed})
        return [i for i in layers if (i, "attn") in self.removed and (i, "mlp") in self.removed]

    def describe(self) -> dict[str, Any]:
        first = self.removed[0]
        entry: dict[str, Any] = {"into_layer": first[0] - (first[1] == "attn")}
        if self.whole_blocks:
            entry["blocks"] = [first[0], self.removed[-1][0]]
        else:
            entry["sublayers"] = [list(s) for s in self.removed]
            entry["blocks"] = self.blocks
        if self.target is not None:
            entry["into"] = PROJECTIONS[self.target[1]]
        return entry


def sublayer_runs(plan: Plan) -> list[Run]:
    """Every maximal run of removed sublayers, in stream order."""
    order = [(layer, kind) for layer in range(plan.num_layers) for kind in ("attn", "mlp")]
    gone = {(i, k) for i in plan.blocks for k in ("attn", "mlp")}
    gone |= {(i, "attn") for i in plan.attn} | {(i, "mlp") for i in plan.mlp}
    runs, current = [], []
    for position, sublayer in enumerate(order):
        if sublayer in gone:
            current.append(sublayer)
        elif current:
            runs.append(Run(_before(order, position - len(current)), tuple(current)))
            current = []
    if current:
        runs.append(Run(_before(order, len(order) - len(current)), tuple(current)))
    return runs


def _before(order: list[Sublayer], position: int) -> Sublayer | None:
    return order[position - 1] if position > 0 else None


def fit_correction(gram: torch.Tensor, cross: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """ΔW (d, m) minimising ||D − X ΔWᵀ||² + λ||ΔW||² from XᵀX (m, m) and XᵀD (m, d)."""
    lam = damp * float(gram.diagonal().mean()) if damp > 0 else 0.0
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.lstsq(system, cross).solution.T  # lstsq: safe when X is rank-deficient


def cross_validated_damping(
    folds: list[dict[str, torch.Tensor]], grid: tuple[float, ...] = DAMPING_GRID
) -> tuple[float, dict[float, float]]:
    """The damping of ``grid`` whose fit on all folds but one best predicts the one left out
    (summed over folds), and each candidate's held-out error. One eigendecomposition per fold
    serves the whole grid: (G + λI)⁻¹ C = Q diag(1 / (Λ + λ)) Qᵀ C."""
    errors = dict.fromkeys(grid, 0.0)
    for held in range(len(folds)):
        rest = [f for i, f in enumerate(folds) if i != held]
        gram = sum(f["gram"] for f in rest)
        cross = sum(f["cross"] for f in rest)
        values, vectors = torch.linalg.eigh(gram)
        projected = vectors.T @ cross
        scale = float(gram.diagonal().mean())
        for damp in grid:
            solved = vectors @ (projected / (values.clamp_min(0) + damp * scale)[:, None])
            errors[damp] += residual_energy(folds[held], solved.T)
    best = min(grid, key=errors.get)
    return best, errors


def cosine_correction(
    delta: torch.Tensor,
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    steps: int = COSINE_STEPS,
    rate: float = COSINE_RATE,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ΔW refined from ``delta`` (the least-squares one) to minimise the mean over tokens of
    1 − cos(h + X ΔWᵀ, h + D), ``samples`` the per-batch (X, h, D); and the mean distance of
    no correction, of ``delta`` and of the result. Adam, full batch, its step ``rate`` × the
    root mean square of ``delta``'s entries. Not L-BFGS: the gradient is tiny (norm 5e-5
    against ΔW's 207 on SmolLM2), so its first steps change each token's cosine by less than
    float32 resolves, and its line search made no progress at all."""
    tokens = sum(len(x) for x, _, _ in samples)

    def distance(w: torch.Tensor) -> torch.Tensor:
        total = w.new_zeros((), dtype=torch.float64)
        for x, base, d in samples:
            cosine = torch.cosine_similarity(base + x @ w.T, base + d, dim=-1)
            total = total + (1 - cosine).double().sum()
        return total / tokens

    start = delta.float()
    weight = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight], lr=rate * float(start.pow(2).mean().sqrt()))
    best, best_distance = start, float(distance(start))
    report = {"none": float(distance(torch.zeros_like(start))), "least_squares": best_distance}
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            loss = distance(weight)
            value = float(loss.detach())
            if value < best_distance:  # the weight this loss was taken at
                best, best_distance = weight.detach().clone(), value
            loss.backward()
            optimizer.step()
    final = float(distance(weight.detach()))
    if final < best_distance:
        best, best_distance = weight.detach(), final
    report["refined"] = best_distance
    return best.to(delta.dtype), report


def residual_energy(stats: dict[str, torch.Tensor], delta: torch.Tensor) -> float:
    """||D − X ΔWᵀ||² from the statistics: DᵀD − 2⟨ΔW, (XᵀD)ᵀ⟩ + ⟨ΔW, ΔW XᵀX⟩."""
    return float(
        stats["energy"]
        - 2 * (delta * stats["cross"].T).sum()
        + (delta @ stats["gram"] * delta).sum()
    )


def projection(model: PreTrainedModel, adapter: Adapter, target: Sublayer) -> nn.Module | None:
    """The output projection of sublayer ``target`` (o_proj / down_proj), or None where the
    adapter does not know it (an MLP of routed experts has no single one)."""
    layer, kind = target
    layout = adapter.heads if kind == "attn" else adapter.channels
    if layout is None:
        return None
    name = layout.o if kind == "attn" else layout.output
    return adapter.layers(model)[layer].get_submodule(name)


@dataclass
class SpanStatistics:
    """XᵀX, XᵀD, DᵀD (float64) of one run's fit, per fold (batches dealt in turn) so that a
    damping can be chosen on held-out windows; X gets a column of ones for an intercept."""

    intercept: bool
    parts: list[torch.Tensor] = field(default_factory=list)  # D per batch, consumed in order
    # with bases (h_before per batch), every batch's (X, h_before, D) is kept too, in float32
    bases: list[torch.Tensor] | None = None
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    folds: list[dict[str, Any]] = field(
        default_factory=lambda: [{"gram": 0, "cross": 0, "energy": 0} for _ in range(FOLDS)]
    )
    batches: int = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.intercept:
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        d = self.parts.pop(0).reshape(len(x), -1).double()
        fold = self.folds[self.batches % len(self.folds)]
        fold["gram"] = fold["gram"] + x.T @ x
        fold["cross"] = fold["cross"] + x.T @ d
        fold["energy"] = fold["energy"] + (d * d).sum()
        if self.bases is not None:
            base = self.bases.pop(0).reshape(len(x), -1).float()
            self.samples.append((x.float(), base, d.float()))
        self.batches += 1

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {key: sum(f[key] for f in self.folds) for key in ("gram", "cross", "energy")}


class Healing:
    """The healing step of the cut (module docstring): at a layer holding the kept sublayer
    before a run, fit and add the run's correction (the walk then runs the healed layer)."""

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: Adapter,
        plan: Plan,
        damp: float | str = DAMP,
        bias: bool = False,
        target: str = "local",
        objective: str = "lsq",
    ) -> None:
        if target not in HEAL_TARGETS:
            raise ConfigError(f"Healing target must be one of {HEAL_TARGETS}; got {target!r}.")
        if objective not in HEAL_OBJECTIVES:
            raise ConfigError(
                f"Healing objective must be one of {HEAL_OBJECTIVES}; got {objective!r}."
            )
        self.model, self.adapter, self.plan = model, adapter, plan
        self.damp, self.target, self.objective = damp, target, objective
        self.bias = bias and _bias_available(model, adapter)
        method = "least-squares" if objective == "lsq" else "cosine-distance"
        self.report: dict[str, Any] = {
            "method": f"{method} output projection" + (" + bias" if self.bias else ""),
            "damp": damp,
            "target": target,
            "objective": objective,
            "runs": [],
        }
        self.runs: dict[int, Run] = {}
        for run in sublayer_runs(plan):
            why = self._refusal(run)
            if why:
                self._skip(run, why)
            else:
                self.runs[run.target[0]] = run

    def _refusal(self, run: Run) -> str:
        """Why a linear correction cannot absorb ``run`` ("" if it can)."""
        if run.target is None or projection(self.model, self.adapter, run.target) is None:
            return "no kept output projection before the run"
        if run.target[1] == "mlp" and self.adapter.channels.conv1d:
            return "a Conv1D MLP output projection"
        if run.target[1] == "attn" and self.adapter.heads.conv1d:
            return "a Conv1D attention output projection"
        if self.adapter.output_norms:
            return "the family normalises branch outputs before the residual add"
        if not run.whole_blocks and self.adapter.parallel_residual(self.model.config):
            return "the branches of a parallel-residual block read the same input"
        if not run.whole_blocks and self.target == "dense":
            return "target 'dense' heals runs of whole blocks only"
        return ""

    @property
    def needs_dense_stream(self) -> bool:
        return self.target == "dense" and bool(self.runs)

    @property
    def last_layer(self) -> int:
        """The last layer the walk must reach (the last healed run's target)."""
        return max(self.runs, default=-1)

    def heals_into(self, index: int) -> bool:
        return index in self.runs

    @torch.no_grad()
    def layer(self, step: Step, dense: list[torch.Tensor] | None = None) -> bool:
        """Fit and add the correction of the run that layer ``step.index`` absorbs; True (the
        layer changed). ``dense``: the dense model's stream after the run (target "dense")."""
        run = self.runs[step.index]
        target = projection(self.model, self.adapter, run.target)
        before = self._before_run(step, run)
        after = dense if dense is not None else self._through(step, run, before)
        intercept = self.bias and run.target[1] == "mlp"
        parts = [a - b for a, b in zip(after, before, strict=True)]
        bases = before if self.objective == "cosine" else None
        stats = SpanStatistics(intercept, parts=parts, bases=bases)
        del before, after, parts, bases
        step.run_until(target, stats.add)
        self._correct(target, stats, run, intercept)
        return True

    def _before_run(self, step: Step, run: Run) -> list[torch.Tensor]:
        """The stream right after the run's target sublayer, on the pruned model."""
        if run.target[1] == "mlp":
            return step.flow.run_unedited(step.index, step.hidden)  # the layer's output
        with masked(self.model, self.adapter, [Unit(step.index, "mlp")]):
            return step.flow.run_unedited(step.index, step.hidden)  # after the attention

    def _through(self, step: Step, run: Run, hidden: list[torch.Tensor]) -> list:
        """``hidden`` through the run's removed sublayers (present), in stream order."""
        flow, session = step.flow, step.flow.session
        for layer in sorted({i for i, _ in run.removed}):
            kinds = {k for i, k in run.removed if i == layer}
            kept = [Unit(layer, k) for k in ("attn", "mlp") if k not in kinds]
            with session.loaded(layer), masked(self.model, self.adapter, kept):
                hidden = flow.run_unedited(layer, hidden)
        return hidden

    def _correct(self, target: nn.Module, fitted: SpanStatistics, run: Run, intercept: bool):
        stats, damp, chosen = fitted.as_dict(), self.damp, {}
        if damp == "auto":
            if fitted.batches < len(fitted.folds):
                raise ConfigError(
                    f"--heal-damping auto holds windows out: it needs at least {FOLDS} batches "
                    "(more --heal-samples, or a smaller --batch-size)."
                )
            damp, errors = cross_validated_damping(fitted.folds)
            chosen = {"damp": damp, "held_out_error": {str(k): v for k, v in errors.items()}}
        delta = fit_correction(stats["gram"], stats["cross"], damp)
        refined = {}
        if self.objective == "cosine":
            delta, distances = cosine_correction(delta, fitted.samples)
            fitted.samples.clear()
            refined["cosine_distance"] = distances
        entry = {
            **run.describe(),
            **chosen,
            "error_before": float(stats["energy"]),
            "error_after": residual_energy(stats, delta),
            **refined,
        }
        if intercept:
            target.bias += delta[:, -1].to(target.bias.dtype)
            delta = delta[:, :-1]
        target.weight += delta.to(target.weight.dtype)
        self.report["runs"].append(entry)
        log.info(
            "healing: %s into layer %d's %s: error %.4g -> %.4g",
            entry.get("sublayers") or f"blocks {entry['blocks']}",
            run.target[0],
            entry["into"],
            entry["error_before"],
            entry["error_after"],
        )

    def _skip(self, run: Run, why: str) -> None:
        self.report["runs"].append({**run.describe(), "skipped": why})
        log.info("healing: %s skipped (%s)", run.describe(), why)

    def finish(self, samples: int) -> dict[str, Any]:
        self.report["runs"].sort(key=lambda entry: entry["into_layer"])
        return {**self.report, "samples": samples}


def _bias_available(model: PreTrainedModel, adapter: Adapter) -> bool:
    if adapter.channels is None or adapter.channels.conv1d:
        return False
    if projection(model, adapter, (0, "mlp")).bias is not None:
        return True
    if not bias_flag_supported(model.config, adapter.channels.bias_flag):
        log.info(
            "healing: %s cannot express a down_proj bias; weights only", model.config.model_type
        )
        return False
    add_output_bias(model, adapter, "channels")
    return True
