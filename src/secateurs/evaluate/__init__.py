"""Evaluation: perplexity (``ppl``), greedy generations (``generate``); zero-shot and
efficiency live beside them."""

from secateurs.evaluate.generate import GenerationResult, generate_greedy
from secateurs.evaluate.ppl import PPLProtocol, PPLResult, perplexity

__all__ = ["GenerationResult", "PPLProtocol", "PPLResult", "generate_greedy", "perplexity"]
