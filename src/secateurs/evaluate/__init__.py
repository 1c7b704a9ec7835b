"""Evaluation: perplexity (``ppl``); zero-shot and efficiency live beside it.

The exports are imported on first use, so that importing a light submodule (the zero-shot task
list, the bench protocol) does not import torch.
"""

from importlib import import_module
from typing import Any

__all__ = ["PPLProtocol", "PPLResult", "perplexity"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(import_module("secateurs.evaluate.ppl"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
