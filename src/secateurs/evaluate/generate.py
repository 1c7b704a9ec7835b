"""Greedy generations for a few fixed prompts, and how repetitive they are.

Perplexity can hide what a user sees first: a pruned model that loops ("It is a language of
France. It is a language of France. It is a …"). ``eval generate --save`` stores each model's
continuations in its ``results.json`` (key ``generations``; the dense model's beside it under
``dense``), and the report and the model card show them side by side. Measuring and showing are
separate on purpose: the report reads files and loads no model, like every other section.

Repetition is the distinct-n ratio (Li et al., 2016, arXiv 1510.03055): distinct word n-grams /
all word n-grams of the continuation; 1.0 = no n-gram repeats, a loop drives it toward 0. Words,
not tokens, so models with different tokenizers compare.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PROMPTS = (
    "The capital of France is",
    "The best way to learn a new language is",
    "Once upon a time, there was a",
    "Water boils at",
)
NEW_TOKENS = 30
DISTINCT_N = 2


def distinct_ngrams(text: str, n: int = DISTINCT_N) -> float | None:
    """Distinct word n-grams / all word n-grams of ``text``; None below n words."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


@dataclass(frozen=True)
class Generation:
    prompt: str
    text: str  # the continuation only, special tokens removed
    new_tokens: int  # generated, up to the end-of-text token if it came first
    distinct: float | None  # distinct-n ratio of ``text`` (n = protocol's distinct_n)


@dataclass(frozen=True)
class GenerationResult:
    generations: list[Generation]
    mean_distinct: float | None  # over the prompts with at least n words
    seconds: float
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] = PROMPTS,
    new_tokens: int = NEW_TOKENS,
) -> GenerationResult:
    """Greedy continuation of each prompt (one at a time: no padding to get wrong)."""
    from secateurs.errors import ConfigError

    if new_tokens <= 0:
        raise ConfigError(f"new_tokens must be positive; got {new_tokens}.")
    if not prompts:
        raise ConfigError("No prompts given.")
    start = time.perf_counter()
    generations = [_one(model, tokenizer, prompt, new_tokens) for prompt in prompts]
    seconds = time.perf_counter() - start
    values = [g.distinct for g in generations if g.distinct is not None]
    protocol = {
        "decoding": "greedy",
        "new_tokens": new_tokens,
        "stops_at_eos": True,
        "chat_template": False,
        "distinct_n": DISTINCT_N,
    }
    mean = sum(values) / len(values) if values else None
    return GenerationResult(generations, mean, seconds, protocol)


def _one(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> Generation:
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos
    )
    with torch.no_grad():
        output = model.eval().generate(**inputs, generation_config=config)
    ids = output[0, inputs["input_ids"].shape[1] :]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Generation(prompt, text.strip(), len(ids), distinct_ngrams(text))


# --- showing them (plain data: results.json dicts) ----------------------------------------------


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "(nothing)"


def _distinct(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def side_by_side(results: dict[str, Any], name: str = "pruned") -> str:
    """A markdown table of a run's generations beside its dense model's (if saved), one row
    per prompt; empty when the run has none."""
    own = (results.get("generations") or {}).get("generations") or []
    if not own:
        return ""
    dense_entry = results.get("dense") or {}
    dense = {g["prompt"]: g for g in (dense_entry.get("generations") or {}).get("generations", [])}
    n = (results["generations"].get("protocol") or {}).get("distinct_n", DISTINCT_N)
    head = ["prompt", *(["dense", f"distinct-{n}"] if dense else []), name, f"distinct-{n}"]
    align = ["---", *(["---", "---:"] if dense else []), "---", "---:"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    for gen in own:
        cells = [_cell(gen["prompt"])]
        if dense:
            other = dense.get(gen["prompt"]) or {"text": "–", "distinct": None}
            cells += [_cell(other["text"]), _distinct(other["distinct"])]
        cells += [_cell(gen["text"]), _distinct(gen["distinct"])]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def format_plain(runs: dict[str, dict[str, Any]]) -> str:
    """Several models' generations for the terminal: per prompt, one line per model."""
    names = list(runs)
    width = max(len(n) for n in names)
    n = next(iter(runs.values()))["protocol"].get("distinct_n", DISTINCT_N)
    lines = []
    prompts = [g["prompt"] for g in next(iter(runs.values()))["generations"]]
    for index, prompt in enumerate(prompts):
        lines.append(f"{prompt!r}")
        for name in names:
            gen = runs[name]["generations"][index]
            lines.append(
                f"  {name:<{width}}  distinct-{n} {_distinct(gen['distinct'])}:  "
                f"{' '.join(gen['text'].split())}"
            )
    return "\n".join(lines)
