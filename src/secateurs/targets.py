"""``--target``: width allocation that stays servable by one engine family.

Each target is a small set of allocation constraints applied *before* units are chosen, so the
allocation picks the best model among those the engine can load, instead of pruning freely and
finding out at export time:

- ``hf`` (plain config; transformers, lm-eval, every engine's converter): one width for every
  layer: uniform heads *and* channels.
- ``vllm`` (DeciLM / nemotron-nas block_configs; also SGLang, TensorRT-LLM): query heads are
  fixed per model, so KV groups are removed alike in every layer; MLP widths may differ per
  layer, each kept on a multiple of 64 (tensor-parallel splits up to 8 ranks and quantized
  GEMM tiles stay whole).
- ``llama.cpp`` (GGUF ``deci``): per-layer heads and widths are fine; MLP widths on a multiple
  of 32, the block size of its Q4_0/Q8_0 quantization (use ``--round-to 256`` for k-quants).
- ``sglang`` / ``tensorrt-llm`` (DeciLM too): as ``vllm``, but they build every MLP from
  ``ffn_mult`` (widths on multiples of 256) and have no output biases (no FLAP compensation).

A user's ``--round-to`` is combined with the target's (least common multiple).

``--engine`` (with ``--latency``): the engines whose measured speed can budget ``--unit auto``,
declared here so a spec checks the name without importing ``secateurs.latency`` (which builds
and times models); ``secateurs.latency.engines`` registers each one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from secateurs.errors import ConfigError
from secateurs.registry import Registry


@dataclass(frozen=True)
class Target:
    """Constraints an engine puts on per-layer widths."""

    name: str
    export: str  # the `secateurs export --to` format that serves it
    round_to: int  # MLP channels kept on a multiple of this
    uniform: tuple[str, ...]  # unit kinds that must have one width in every layer
    biases: bool = True  # False: the engine has no output biases (no FLAP compensation)


TARGETS: Registry[Target] = Registry("target")
for _target in (
    Target("hf", "hf", 1, ("heads", "channels")),
    Target("vllm", "decilm", 64, ("heads",)),
    Target("llama.cpp", "gguf", 32, ()),
    # SGLang and TensorRT-LLM read only ffn_mult (widths on multiples of 256) and no biases
    Target("sglang", "decilm", 256, ("heads",), biases=False),
    Target("tensorrt-llm", "decilm", 256, ("heads",), biases=False),
):
    TARGETS.add(_target.name, _target)


# Engines whose per-layer latency table prices --unit auto's candidates (secateurs.latency).
LATENCY_ENGINES: Registry[Any] = Registry("latency engine")
LATENCY_ENGINES.declare("llama.cpp", "secateurs.latency.engines", aliases=("llamacpp", "llama-cpp"))


def width_constraints(
    target: str | None,
    *,
    unit: str,
    allocation: str,
    layers: Any = None,
    round_to: int = 1,
    uniform_widths: bool | tuple[str, ...] = False,
    compensate: bool | None = None,
) -> dict[str, Any]:
    """``round_to`` and ``uniform_widths`` for ``prune(...)`` that satisfy ``target``.

    Fails (before any work) where no allocation with these options can satisfy it.
    """
    if target is None:
        return {"round_to": round_to, "uniform_widths": uniform_widths}
    if compensate and not TARGETS.get(target).biases:
        raise ConfigError(f"--target {target}: the engine has no output biases; drop --compensate.")
    spec = TARGETS.get(target)
    kinds = {"heads": ("heads",), "channels": ("channels",)}.get(unit, ("heads", "channels"))
    needed = tuple(k for k in spec.uniform if k in kinds)
    if needed and layers is not None:
        raise ConfigError(
            f"--target {target} needs {' and '.join(needed)} alike in every layer, but --layers "
            f"prunes only some layers; drop --layers (or prune --unit channels for vllm)."
        )
    if uniform_widths is True:
        needed = kinds
    else:
        needed = tuple(dict.fromkeys((*needed, *(uniform_widths or ()))))
    return {
        "compensate": compensate if spec.biases else False,
        "round_to": math.lcm(round_to, spec.round_to),
        # uniform allocation already gives every layer one width
        "uniform_widths": needed if allocation == "global" and needed else False,
    }
