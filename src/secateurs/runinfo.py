"""What every pruning record holds whatever the unit: parameter counts, peak memory, versions,
and the calibration tokens with their description. Shared by the depth, width, experts and
layer-by-layer paths (so none of them imports another to get these)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import platform
import resource
import sys
from dataclasses import asdict
from typing import Any

import torch
import transformers
from torch import nn
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs import __version__
from secateurs.data import CalibrationConfig
from secateurs.errors import ConfigError


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once); works on ``meta`` models too."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if platform.system() == "Darwin" else 1)


def return_freed_memory() -> None:
    """Give freed heap pages back to the OS. glibc keeps them otherwise: after a layer, a fit or
    a tokenizer run, tens of MB per step that a layer-by-layer run would carry to its end."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().malloc_trim(0)


def map_large_blocks(threshold: int = 128 * 1024) -> None:
    """Have glibc serve every allocation above ``threshold`` bytes from a mapping of its own,
    unmapped when freed. By default glibc raises that threshold to each large block freed (up
    to 32 MB), so a layer-by-layer run's many 1-32 MB temporaries come from the heap, which
    fragments: at 14B the heap held 1 GB at the peak of a layer's fit; with this, 0.15 GB
    less at four layers and no growth with depth (docs/scale.md)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            _libc().mallopt(M_MMAP_THRESHOLD, threshold)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@functools.cache
def _libc() -> ctypes.CDLL:
    """glibc, loaded once: each ``CDLL`` builds reference cycles that only the cyclic garbage
    collector frees (one per released layer, before this)."""
    return ctypes.CDLL("libc.so.6")


def versions() -> dict[str, str]:
    return {
        "secateurs": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def calibration_tokens(
    needed: bool,
    calibration: CalibrationConfig | torch.Tensor | None,
    tokenizer: Tokenizer | None,
    data_root: str | os.PathLike | None,
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """(token windows, their record): a given tensor, or ``calibration`` (default: Shortened
    LLaMA's 10 C4 windows of 128 tokens) sampled with ``tokenizer``; (None, None) if not
    ``needed``."""
    if not needed:
        return None, None
    if isinstance(calibration, torch.Tensor):
        return calibration, {
            "source": "tensor",
            "n_samples": len(calibration),
            "seq_len": calibration.shape[1],
        }
    config = calibration or CalibrationConfig()
    if tokenizer is None:
        raise ConfigError("A tokenizer is needed to build calibration samples.")
    return config.load(tokenizer, data_root), asdict(config)
