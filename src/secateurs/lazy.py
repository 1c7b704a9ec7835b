"""A model whose decoder layers stay on disk until a pipeline needs them.

``LazyModel(source)`` builds the model of a safetensors checkpoint with every parameter on the
``meta`` device (buffers such as rotary tables are real: they are computed, not stored), loads
the small non-layer parameters (norms, position embeddings), and then reads one decoder layer
at a time (``with lazy.loaded(i): ...``) in the compute dtype on the compute device, putting it
back on ``meta`` afterwards. The input embedding is never loaded whole: ``embedded(ids)`` gives
it only the rows of the calibration tokens (a 128k-token vocabulary is 0.8-1.6 GB, more than a
layer), and the output head is read in row blocks by ``head_nll``. So the resident memory is
one layer in the compute dtype plus the calibration activations, whatever the model's size.

Parameters map one to one to checkpoint tensors (found exactly as ``save_pretrained`` names
them, tied copies included). Families whose checkpoints are converted on load (MoE experts
stored one by one and stacked in memory) are refused: load those in memory.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.runinfo import return_freed_memory
from secateurs.streaming import CheckpointReader, check_plain_source, saved_state

log = logging.getLogger(__name__)

# Logit transforms some families apply after the head (elementwise, so exact per vocab block).
_LOGIT_MULTIPLIERS = ("logit_scale",)  # Cohere: logits * logit_scale
_LOGIT_DIVISORS = ("logits_scaling",)  # Granite: logits / logits_scaling
_SOFTCAP = "final_logit_softcapping"  # Gemma 2/3: tanh(logits / c) * c
_LOGITS_BYTES = 64 * 2**20  # the logits of one head block (``token_nll``)


def checkpoint_bytes_on_disk(source: str | os.PathLike) -> int:
    """Bytes of the safetensors files of ``source``."""
    reader = CheckpointReader(source)
    return sum(path.stat().st_size for path in set(reader.files.values()))


def bytes_to_load(source: str | os.PathLike, dtype: torch.dtype = torch.float32) -> int:
    """What loading ``source`` whole in ``dtype`` takes: its parameters × the dtype's size."""
    reader = CheckpointReader(source)
    count = sum(reader.meta(name).numel() for name in reader.names())
    return count * torch.empty((), dtype=dtype).element_size()


def available_memory() -> int:
    """Memory the OS can give this process now (free + reclaimable cache)."""
    import psutil

    return int(psutil.virtual_memory().available)


class LazyModel:
    """The model of ``source`` on ``meta``, with its layers read from disk one at a time."""

    def __init__(
        self,
        source: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str | None = None,
    ) -> None:
        check_plain_source(source)
        self.source, self.dtype, self.device = Path(source), dtype, torch.device(device)
        self.reader = CheckpointReader(source)
        self.config = AutoConfig.from_pretrained(source)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(
                self.config, dtype=dtype, attn_implementation=attn_implementation
            ).eval()
        self.model.tie_weights()  # as from_pretrained does: a tied head is the embedding
        self.model.requires_grad_(False)
        self.adapter = adapter_for(self.model)
        self.layers = self.adapter.layers(self.model)
        self.names = self._checkpoint_names()
        self.new_parameters: set[str] = set()  # added by surgery (zero biases): not on disk
        self._load_resident()

    # --- names ---------------------------------------------------------------------------
    def _checkpoint_names(self) -> dict[str, str]:
        """Each parameter's (full) name → the name of the checkpoint tensor that holds it."""
        stored = {id(tensor): name for name, tensor in saved_state(self.model).items()}
        names, missing = {}, []
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in stored:
                names[name] = stored[id(param)]
            else:
                missing.append(name)
        if missing:
            raise UnsupportedModelError(
                f"{self.source}: parameters {missing[:3]} are converted from the checkpoint on "
                f"load ({self.config.model_type}); layer-by-layer loading needs a one-to-one "
                "mapping. Load this model in memory (no --sequential)."
            )
        absent = sorted({n for n in names.values() if n not in self.reader.names()})
        if absent:
            raise ConfigError(f"{self.source}: tensors {absent[:3]} are not in the checkpoint.")
        return names

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def _is_big(self, name: str) -> bool:
        big = {id(self.model.get_input_embeddings().weight)}
        head = self.model.get_output_embeddings()
        if head is not None:
            big.add(id(head.weight))
        return id(self.model.get_parameter(name)) in big

    # --- loading -------------------------------------------------------------------------
    def _load(self, module: nn.Module, prefix: str) -> None:
        for name, param in list(module.named_parameters()):
            full = prefix + name
            if full in self.new_parameters:
                value = torch.zeros(param.shape, dtype=self.dtype)
            else:
                value = self.reader.read(self.names[full]).to(self.dtype)
            set_module_tensor_to_device(module, name, self.device, value=value)

    def _load_resident(self) -> None:
        """Everything outside the decoder layers but the input embedding and output head."""
        layers = self.adapter.layers_path + "."
        for name, _ in list(self.model.named_parameters()):
            if not name.startswith(layers) and not self._is_big(name):
                value = self.reader.read(self.names[name]).to(self.dtype)
                set_module_tensor_to_device(self.model, name, self.device, value=value)

    def load_layer(self, index: int) -> nn.Module:
        self._load(self.layers[index], self.layer_prefix(index))
        return self.layers[index]

    def release_layer(self, index: int) -> None:
        layer = self.layers[index]
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta")
        return_freed_memory()

    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` with real weights inside the block, back on ``meta`` after it."""
        try:
            yield self.load_layer(index)
        finally:
            self.release_layer(index)

    # --- the big ends of the model ----------------------------------------------------------
    @contextmanager
    def embedded(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """Give the input embedding the rows of ``ids``' tokens only; yields ``ids`` renumbered
        into those rows (positions are unchanged, so the forward is the same)."""
        embedding = self.model.get_input_embeddings()
        tokens, compact = torch.unique(ids, return_inverse=True)
        name = self.names[_param_name(self.model, embedding.weight)]
        rows = self.reader.rows(name, tokens).to(self.dtype)
        original, padding = embedding.weight, getattr(embedding, "padding_idx", None)
        embedding.weight = nn.Parameter(rows.to(self.device), requires_grad=False)
        if padding is not None:
            embedding.padding_idx = None  # an index into the full table; it only masks gradients
        try:
            yield compact
        finally:
            embedding.weight = original
            if padding is not None:
                embedding.padding_idx = padding

    def head_nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        """Summed next-token NLL of windows ``ids`` from final hidden states (after the final
        norm), reading the output head in row blocks; and the number of predicted tokens."""
        nll = self.token_nll(hidden, ids)
        return float(nll.sum()), nll.numel()

    def token_nll(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token NLL (B, T − 1) float64 of windows ``ids`` (B, T) from final hidden states,
        reading the output head in row blocks."""
        head = self.model.get_output_embeddings()
        name = self.names[_param_name(self.model, head.weight)]
        bias = getattr(head, "bias", None)
        bias_name = None if bias is None else self.names[_param_name(self.model, bias)]
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1]).to(self.device, self.dtype)
        targets = ids[:, 1:].reshape(-1).to(self.device)
        lse = torch.full((len(states),), -math.inf, dtype=torch.float64, device=self.device)
        picked = torch.zeros(len(states), dtype=torch.float64, device=self.device)
        start = 0
        for block in self.reader.blocks(name, self._head_block_bytes(name, len(states))):
            rows = len(block)
            logits = states @ block.to(self.device, self.dtype).T
            if bias_name is not None:
                logits += self.reader.read(bias_name)[start : start + rows].to(logits)
            logits = self._transform(logits).to(torch.float64)
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < start + rows)
            local = (targets - start).clamp(0, rows - 1)
            picked += torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
            start += rows
        return (lse - picked).reshape(ids.shape[0], -1)

    def _head_block_bytes(self, name: str, positions: int) -> int:
        """Head rows read at a time: their logits for ``positions`` tokens, in float32 and the
        float64 copy, take at most ``_LOGITS_BYTES`` (not a whole default block's worth:
        1016 positions × 29k rows were 0.36 GB at SmolLM2's size)."""
        stored = self.reader.meta(name)
        rows = max(1, _LOGITS_BYTES // (12 * max(1, positions)))
        return rows * stored.shape[-1] * stored.dtype.itemsize

    def _transform(self, logits: torch.Tensor) -> torch.Tensor:
        for key in _LOGIT_MULTIPLIERS:
            if getattr(self.config, key, None):
                logits = logits * getattr(self.config, key)
        for key in _LOGIT_DIVISORS:
            if getattr(self.config, key, None):
                logits = logits / getattr(self.config, key)
        cap = getattr(self.config, _SOFTCAP, None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    for name, candidate in model.named_parameters(remove_duplicate=False):
        if candidate is param:
            return name
    raise ConfigError("A head/embedding parameter is not registered in the model.")
