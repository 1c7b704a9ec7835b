"""What a depth search minimises on the calibration windows: NLL, or divergence from dense.

``nll`` (Shortened LLaMA / SLEB; the default of one-shot ``ppl`` and of the joint sub-block
search): the mean next-token NLL of the pruned model; a candidate's score is its calibration
PPL, exp(NLL).

``kl`` (the greedy block search's default, ``defaults.SEARCH_OBJECTIVE``): the mean over
predicted tokens of KL(dense ‖ pruned), the dense model's next-token distribution read over its
``top_k`` most likely tokens plus one bucket for all the others — the exact KL of the two
distributions coarsened to those k + 1 outcomes (a lower bound of the full KL, equal to it as
k → vocabulary). It scores how far a removal moves the model from what it predicted, over the
whole distribution, instead of how much probability the one observed next token keeps. On
SmolLM2-135M (6 blocks, 32 C4 windows) the search's selections for calibration seeds 0, 1, 2
share five blocks with ``kl`` (four with ``nll``) and all three meet issue 10's healed target
(one with ``nll``; ``docs/depth.md``). Memory: k log-probabilities and indices per calibration
token (32 windows × 128 tokens × k = 64: about 3 MB), not the dense logits.

An objective is prepared once on the dense model's (window ids, logits) batches, then called
on a pruned model's batches in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from secateurs.errors import ConfigError

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of windows ``ids`` (B, T) under ``logits`` (B, T, V), and count."""
    # Shift the targets, not the logits: no copy of the (B, T, V) logits is made.
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    flat = logits.reshape(-1, logits.size(-1))
    nll = F.cross_entropy(flat.float(), targets.reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def mean_nll(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean token NLL over (window ids, logits) batches."""
    total, count = 0.0, 0
    for ids, logits in pairs:
        nll, n = token_nll(logits, ids)
        total, count = total + nll, count + n
    return total / count


class NLL:
    """Mean next-token NLL; shown as calibration PPL."""

    name = "nll"
    label = "calibration PPL"

    def prepare(self, dense: Batches) -> None:
        del dense  # needs no reference

    def __call__(self, batches: Batches) -> float:
        return mean_nll(batches)

    def shown(self, value: float) -> float:
        return math.exp(value)

    def options(self) -> dict:
        return {"objective": self.name}


@dataclass
class DenseKL:
    """Mean KL(dense ‖ pruned) over the dense top-k tokens and one bucket for the rest."""

    top_k: int = 64
    reference: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    name = "kl"
    label = "calibration KL from dense"

    def __post_init__(self) -> None:
        if int(self.top_k) < 1:
            raise ConfigError(f"objective kl: top_k must be ≥ 1, got {self.top_k}.")
        self.top_k = int(self.top_k)

    def prepare(self, dense: Batches) -> None:
        self.reference = []
        for _, logits in dense:
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            top, index = logp.topk(min(self.top_k, logp.shape[-1]), dim=-1)
            self.reference.append((index, with_rest(top)))

    def __call__(self, batches: Batches) -> float:
        if not self.reference:
            raise RuntimeError("DenseKL: prepare() on the dense model's batches first.")
        total, count = 0.0, 0
        for (_, logits), (index, dense) in zip(batches, self.reference, strict=True):
            logq = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, index)
            pruned = with_rest(logq)
            total += float((dense.exp() * (dense - pruned)).sum())
            count += index.shape[0] * index.shape[1]
        return total / count

    def shown(self, value: float) -> float:
        return value

    def options(self) -> dict:
        return {"objective": self.name, "top_k": self.top_k}


def with_rest(top: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of k tokens (…, k) with a last entry for all other tokens (…, k + 1)."""
    covered = torch.logsumexp(top, dim=-1, keepdim=True).clamp(max=0.0)
    # log(1 − e^c), floored so that a distribution the top-k cover entirely stays finite
    rest = torch.log(-torch.expm1(covered)).clamp_min(-80.0)
    return torch.cat([top, rest], dim=-1)


OBJECTIVES = {"nll": NLL, "kl": DenseKL}


def objective(name: str = "nll", **options: object) -> NLL | DenseKL:
    """The objective ``name`` with its options (``top_k`` for ``kl``)."""
    if name not in OBJECTIVES:
        raise ConfigError(f"Unknown search objective {name!r}; expected one of {list(OBJECTIVES)}.")
    if name == "nll" and options:
        raise ConfigError(f"objective nll takes no options; got {sorted(options)}.")
    return OBJECTIVES[name](**options)  # type: ignore[arg-type]


def prepare(flow: Any, goal: NLL | DenseKL) -> None:
    """Give an objective that compares with the base model's predictions those predictions
    (``flow``: a ``session.flow.Flow``)."""
    if goal.name != "nll":
        goal.prepare(flow.logits(flow.final()))


def measure(flow: Any, goal: NLL | DenseKL, perturbations: list[Any]) -> list[float]:
    """``goal`` of each modified model (``edits.Perturbation``) the flow runs; the NLL is read
    from the session's head directly (in row blocks from disk)."""
    if goal.name == "nll":
        return flow.perturbed(perturbations, flow.mean_nll)
    return flow.perturbed(perturbations, lambda final: goal(flow.logits(final)))
