"""The resident session: the whole model in memory (``from_pretrained``, a GGUF, a user's
model object). Layers are always loaded; the head is the model's own."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedModel

from secateurs.adapters import adapter_for
from secateurs.session.base import Session, passthroughs


class ResidentSession(Session):
    kind = "memory"

    def __init__(self, model: PreTrainedModel, tokenizer: Any = None, source: Any = None) -> None:
        super().__init__(model.eval(), adapter_for(model), tokenizer, source)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own forward (final norm, head, soft-capping …) with every layer a
        pass-through and the last one emitting ``hidden``."""
        with torch.no_grad(), passthroughs(self.layers, self.template, lambda: hidden):
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits

    def token_nll(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return token_nll(self.logits(ids, hidden), ids.to(self.device))


def token_nll(logits: torch.Tensor, ids: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Next-token NLL (B, T − 1) in float64, ``chunk`` positions at a time (so no second
    logits-sized tensor is held next to the logits)."""
    steps = ids.shape[1] - 1
    parts = []
    for start in range(0, steps, chunk):
        part = logits[:, start : min(start + chunk, steps)].to(torch.float64)
        target = ids[:, start + 1 : start + 1 + part.shape[1]]
        parts.append(F.cross_entropy(part.transpose(1, 2), target, reduction="none"))
    return torch.cat(parts, dim=1)
