"""Evaluation: perplexity (``ppl``), greedy generations (``generate``); zero-shot and
efficiency live beside them.

The exports are imported on first use, so that importing a light submodule (the zero-shot task
list, the bench protocol) does not import torch.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "PPLProtocol": "ppl",
    "PPLResult": "ppl",
    "perplexity": "ppl",
    "GenerationResult": "generate",
    "generate_greedy": "generate",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(f"secateurs.evaluate.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
