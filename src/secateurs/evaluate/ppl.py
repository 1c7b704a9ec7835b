"""Perplexity with the papers' protocol (LLM-Pruner / Shortened LLaMA / Wanda).

Tokenise the joined text once without special tokens, cut non-overlapping windows of
``seq_len`` tokens, drop the remainder, PPL = exp(mean token NLL). BOS policy:
``stream`` one BOS at the stream start (SL ``ppl.csv``, LLM-Pruner), ``window`` one BOS at the
start of every window (SL ``ppl_bos.csv``; the window then holds seq_len − 1 text tokens),
``none`` no BOS.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.data import load_eval_text
from secateurs.errors import ConfigError, DataError
from secateurs.positions import check_seq_len, max_positions  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

BOS_POLICIES = ("stream", "window", "none")


@dataclass(frozen=True)
class PPLProtocol:
    dataset: str = "wikitext2"
    split: str | None = None
    seq_len: int = 128
    bos: str = "stream"
    max_windows: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2; got {self.seq_len}.")
        if self.bos not in BOS_POLICIES:
            raise ConfigError(f"bos must be one of {BOS_POLICIES}; got {self.bos!r}.")
        if self.max_windows is not None and self.max_windows <= 0:
            raise ConfigError(f"max_windows must be positive; got {self.max_windows}.")


@dataclass(frozen=True)
class PPLResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens
    windows: int
    total_windows: int  # before max_windows
    seconds: float
    protocol: dict

    def to_dict(self) -> dict:
        return asdict(self)


def windows_of(ids: list[int], protocol: PPLProtocol, bos_id: int | None) -> torch.Tensor:
    """Non-overlapping windows (N, seq_len) of the token stream, remainder dropped."""
    if protocol.bos != "none" and bos_id is None:
        raise ConfigError("The tokenizer has no BOS token; use bos='none'.")
    if protocol.bos == "stream":
        ids = [bos_id, *ids]
    width = protocol.seq_len - 1 if protocol.bos == "window" else protocol.seq_len
    count = len(ids) // width
    if count == 0:
        raise DataError(f"The text has {len(ids)} tokens: fewer than one {width}-token window.")
    windows = torch.tensor(ids[: count * width], dtype=torch.long).view(count, width)
    if protocol.bos == "window":
        windows = torch.cat([torch.full((count, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


@torch.no_grad()
def window_nll(model: PreTrainedModel, windows: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of next-token predictions over a batch of windows, and the count predicted."""
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    targets = windows[:, 1:]
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    )
    return float(nll.sum()), nll.numel()


def perplexity(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    protocol: PPLProtocol = PPLProtocol(),
    data_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> PPLResult:
    """Perplexity of ``model`` on ``protocol.dataset`` (see module docstring)."""
    check_seq_len(protocol.seq_len, model.config)
    text = load_eval_text(protocol.dataset, protocol.split, data_root)
    ids = tokenizer(text.text, add_special_tokens=False)["input_ids"]
    windows = windows_of(ids, protocol, tokenizer.bos_token_id)
    total = len(windows)
    windows = windows[: protocol.max_windows] if protocol.max_windows else windows
    device = next(model.parameters()).device
    start, nll_sum, count = time.perf_counter(), 0.0, 0
    batches = range(0, len(windows), protocol.batch_size)
    for i in tqdm(batches, desc=f"ppl {text.dataset}", disable=not progress, leave=False):
        nll, n = window_nll(model.eval(), windows[i : i + protocol.batch_size].to(device))
        nll_sum, count = nll_sum + nll, count + n
    mean = nll_sum / count
    record = dict(asdict(protocol), split=text.split, source=text.source, text_tokens=len(ids))
    return PPLResult(
        ppl=math.exp(mean),
        nll=mean,
        tokens=count,
        windows=len(windows),
        total_windows=total,
        seconds=time.perf_counter() - start,
        protocol=record,
    )
