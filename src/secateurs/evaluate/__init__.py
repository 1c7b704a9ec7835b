"""Evaluation: perplexity (``ppl``); zero-shot and efficiency live beside it."""

from secateurs.evaluate.ppl import PPLProtocol, PPLResult, perplexity

__all__ = ["PPLProtocol", "PPLResult", "perplexity"]
