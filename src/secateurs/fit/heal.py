"""Training-free healing after block removal, absorbed into a standard checkpoint.

For each run of consecutive removed blocks a..b, the kept block p = a-1 before it has an MLP
output projection (down_proj) whose output adds straight into the residual stream. On
calibration windows we record that projection's inputs X (tokens, m) and the removed blocks'
contribution D = h_out(b) - h_in(a) (tokens, d), and fit the damped least-squares correction

    ΔW = argmin ||D - X ΔWᵀ||² + λ||ΔW||²,   λ = damp · mean(diag(XᵀX)),

then add ΔW to down_proj's weight (ReplaceMe's estimator, arXiv 2505.02819). The checkpoint
keeps its shapes and config, so any engine loads it. Runs are healed in order as the cut walks
the layers, each on the already-pruned and healed model's activations. Because ΔW = 0 is a
candidate, the correction never increases the calibration error ||D - X ΔWᵀ||².

``target="dense"`` fits D = (the dense model's stream after b) − h_in(a) instead: it also
corrects the drift earlier removals left in the stream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from secateurs.adapters import Adapter
from secateurs.defaults import HEAL_TARGETS
from secateurs.errors import ConfigError
from secateurs.plan import Plan
from secateurs.session.flow import Step
from secateurs.units.width import add_output_bias, bias_flag_supported

log = logging.getLogger(__name__)

DAMP = 0.01


def runs_of(blocks: tuple[int, ...]) -> list[tuple[int, int]]:
    """Maximal runs (first, last) of consecutive layer indices."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(blocks):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer, layer))
    return runs


def fit_correction(gram: torch.Tensor, cross: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """ΔW (d, m) minimising ||D − X ΔWᵀ||² + λ||ΔW||² from XᵀX (m, m) and XᵀD (m, d)."""
    lam = damp * float(gram.diagonal().mean()) if damp > 0 else 0.0
    system = gram + lam * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.lstsq(system, cross).solution.T  # lstsq: safe when X is rank-deficient


def residual_energy(stats: dict[str, torch.Tensor], delta: torch.Tensor) -> float:
    """||D − X ΔWᵀ||² from the statistics: DᵀD − 2⟨ΔW, (XᵀD)ᵀ⟩ + ⟨ΔW, ΔW XᵀX⟩."""
    return float(
        stats["energy"]
        - 2 * (delta * stats["cross"].T).sum()
        + (delta @ stats["gram"] * delta).sum()
    )


def mlp_output(model: PreTrainedModel, adapter: Adapter, layer: int) -> nn.Module | None:
    """The MLP output projection of ``layer``, or None where the adapter does not know it."""
    if adapter.channels is None:
        return None
    return adapter.layers(model)[layer].get_submodule(adapter.channels.output)


@dataclass
class SpanStatistics:
    """XᵀX, XᵀD, DᵀD (float64) of one run's fit; X gets a column of ones for an intercept."""

    intercept: bool
    gram: Any = 0
    cross: Any = 0
    energy: Any = 0
    parts: list[torch.Tensor] = field(default_factory=list)  # D per batch, consumed in order

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        if self.intercept:
            x = torch.cat([x, x.new_ones(len(x), 1)], dim=1)
        d = self.parts.pop(0).reshape(len(x), -1).double()
        self.gram = self.gram + x.T @ x
        self.cross = self.cross + x.T @ d
        self.energy = self.energy + (d * d).sum()

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {"gram": self.gram, "cross": self.cross, "energy": self.energy}


class Healing:
    """The healing step of the cut (module docstring): at the kept layer before each run of
    removed blocks, fit and add the run's correction, then give the walk the healed output."""

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: Adapter,
        plan: Plan,
        damp: float = DAMP,
        bias: bool = False,
        target: str = "local",
    ) -> None:
        if target not in HEAL_TARGETS:
            raise ConfigError(f"Healing target must be one of {HEAL_TARGETS}; got {target!r}.")
        self.model, self.adapter, self.plan = model, adapter, plan
        self.damp, self.target = damp, target
        self.bias = bias and _bias_available(model, adapter)
        self.runs = {first - 1: (first, last) for first, last in runs_of(plan.blocks)}
        self.report: dict[str, Any] = {
            "method": "least-squares down_proj" + (" + bias" if self.bias else ""),
            "damp": damp,
            "target": target,
            "runs": [],
        }
        for first, last in runs_of(plan.blocks):
            if first == 0:
                self._skip((first, last), "no kept MLP output projection before the run")

    @property
    def needs_dense_stream(self) -> bool:
        return self.target == "dense"

    @property
    def last_layer(self) -> int:
        """The last layer the walk must reach (the last run's end)."""
        return max((last for _, last in self.runs.values()), default=-1)

    def heals_into(self, index: int) -> bool:
        return index in self.runs

    @torch.no_grad()
    def layer(self, step: Step, dense: list[torch.Tensor] | None = None) -> bool:
        """Heal the run after layer ``step.index`` into it; True if the layer changed. Sets
        ``step.output`` (the healed layer's output). ``dense``: the dense model's stream after
        the run (target "dense")."""
        run = self.runs[step.index]
        projection = mlp_output(self.model, self.adapter, step.index)
        if projection is None or step.index in self.plan.mlp or self.adapter.channels.conv1d:
            self._skip(run, "no kept MLP output projection before the run")
            return False
        before = step.advance()
        after = dense if dense is not None else _through_run(step, run, before)
        stats = SpanStatistics(self.bias, parts=[a - b for a, b in zip(after, before, strict=True)])
        step.run_until(projection, stats.add)
        self._correct(projection, stats.as_dict(), run, step.index)
        step.advance()  # the healed output goes on
        return True

    def _correct(self, projection: nn.Module, stats: dict, run: tuple[int, int], into: int) -> None:
        delta = fit_correction(stats["gram"], stats["cross"], self.damp)
        entry = {
            "blocks": list(run),
            "into_layer": into,
            "error_before": float(stats["energy"]),
            "error_after": residual_energy(stats, delta),
        }
        if self.bias:
            projection.bias += delta[:, -1].to(projection.bias.dtype)
            delta = delta[:, :-1]
        projection.weight += delta.to(projection.weight.dtype)
        self.report["runs"].append(entry)
        log.info(
            "healing: blocks %d-%d into layer %d: error %.4g -> %.4g",
            *run,
            into,
            entry["error_before"],
            entry["error_after"],
        )

    def _skip(self, run: tuple[int, int], why: str) -> None:
        self.report["runs"].append({"blocks": list(run), "into_layer": run[0] - 1, "skipped": why})
        log.info("healing: run %s skipped (%s)", run, why)

    def finish(self, samples: int) -> dict[str, Any]:
        self.report["runs"].sort(key=lambda entry: entry["blocks"])
        return {**self.report, "samples": samples}


def _through_run(step: Step, run: tuple[int, int], hidden: list[torch.Tensor]) -> list:
    """The removed blocks ``run`` (loaded one at a time) on ``hidden``: the run's output."""
    flow, session = step.flow, step.flow.session
    for index in range(run[0], run[1] + 1):
        with session.loaded(index):
            hidden = flow.run_unedited(index, hidden)
    return hidden


def _bias_available(model: PreTrainedModel, adapter: Adapter) -> bool:
    if adapter.channels is None or adapter.channels.conv1d:
        return False
    if mlp_output(model, adapter, 0).bias is not None:
        return True
    if not bias_flag_supported(model.config, adapter.channels.bias_flag):
        log.info(
            "healing: %s cannot express a down_proj bias; weights only", model.config.model_type
        )
        return False
    add_output_bias(model, adapter, "channels")
    return True
