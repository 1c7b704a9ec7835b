"""The calibration windows of one run, tokenized once per size, and the flows over them.

Scoring uses ``n_samples`` windows (Shortened LLaMA: 10 × 128 tokens); fits want many more
tokens than scoring (a least-squares fit of m inputs needs more than m tokens): healing uses
``heal_samples`` windows, reconstruction at least ``reconstruct_samples``. All are drawn from the
same source with the same seed, so a larger set begins with the smaller one's documents.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from secateurs.errors import ConfigError
from secateurs.runinfo import return_freed_memory
from secateurs.session.base import Session
from secateurs.session.flow import Flow
from secateurs.session.lazy import available_memory
from secateurs.spec import DataSpec

log = logging.getLogger(__name__)


class Windows:
    """Token windows of ``data`` for ``session`` (its tokenizer), made on first use."""

    def __init__(
        self, data: DataSpec, session: Session, progress: bool = True, offload_dir: Any = None
    ) -> None:
        self.data, self.session, self.progress = data, session, progress
        self.offload_dir = offload_dir
        self._tokens: dict[int, torch.Tensor] = {}
        self.used: dict[str, Any] | None = None  # the scoring windows' record

    @property
    def given(self) -> torch.Tensor | None:
        """Windows given as a tensor (Python API) rather than a source to sample."""
        return self.data.calibration if isinstance(self.data.calibration, torch.Tensor) else None

    def tokens(self, n_samples: int | None = None) -> torch.Tensor:
        """(N, T) token ids: ``n_samples`` windows (default: the scoring count)."""
        if self.given is not None:
            return self.given
        count = n_samples or self.data.n_samples
        if count not in self._tokens:
            self._tokens[count] = self._sample(count)
        return self._tokens[count]

    def _sample(self, count: int) -> torch.Tensor:
        tokenizer = self.session.tokenizer or self._tokenizer()
        config = replace(self.data.config(), n_samples=count)
        tokens = config.load(tokenizer, self.data.data_dir)
        return_freed_memory()  # the tokenizer run's heap, before any layer loads
        return tokens

    def _tokenizer(self) -> Any:
        source = self.session.source
        if source is None or not os.path.isdir(source):
            raise ConfigError(
                "Calibration windows need a tokenizer: pass tokenizer=... with the model, or "
                "calibration=TOKENS (an (N, T) tensor of token ids)."
            )
        from transformers import AutoTokenizer

        self.session.tokenizer = AutoTokenizer.from_pretrained(source)
        return self.session.tokenizer

    def record(self, n_samples: int | None = None) -> dict[str, Any]:
        """What the windows were, for ``secateurs.json``."""
        if self.given is not None:
            return {
                "source": "tensor",
                "n_samples": len(self.given),
                "seq_len": self.given.shape[1],
            }
        return asdict(replace(self.data.config(), n_samples=n_samples or self.data.n_samples))

    def flow(self, n_samples: int | None = None, streams: int = 0) -> Flow:
        """A flow over ``n_samples`` windows through the session's layers; ``streams``: how
        many modified activation streams it will hold at once (``ppl``: one per layer), which
        go to files when they would not fit (``offload``)."""
        tokens = self.tokens(n_samples)
        offload = self.offload(tokens, streams)
        return Flow(self.session, tokens, self.data.batch_size, self.progress, offload)

    def offload(self, tokens: torch.Tensor, streams: int) -> Path | None:
        """``--offload-dir``, or a temporary folder beside the output when the streams would
        take more than a quarter of the memory available now (layer by layer only: in memory
        the model itself is larger than its streams)."""
        if streams == 0 or self.session.kind == "memory":
            return None
        if self.offload_dir is not None:
            return Path(self.offload_dir)
        itemsize = next(self.session.model.parameters()).element_size()
        need = streams * tokens.numel() * self.session.config.hidden_size * itemsize
        if need <= available_memory() / 4:
            return None
        folder = Path(tempfile.mkdtemp(prefix=".secateurs-streams-", dir=self.session.work))
        self.session.temporary.append(folder)
        log.info("%d modified streams need %.1f GB: kept in %s", streams, need / 2**30, folder)
        return folder

    @property
    def available(self) -> bool:
        """Whether windows can be made (a tensor was given, or a tokenizer can be had)."""
        if self.given is not None or self.session.tokenizer is not None:
            return True
        return self.session.source is not None and os.path.isdir(self.session.source)
