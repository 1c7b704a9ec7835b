"""A model whose decoder layers stay on disk until a pipeline needs them.

``LazyModel(source)`` builds the model of a safetensors checkpoint with every parameter on the
``meta`` device (buffers such as rotary tables are real: they are computed, not stored), loads
the small non-layer parameters (norms, position embeddings), and then reads one decoder layer
at a time (``with lazy.loaded(i): ...``) in the compute dtype on the compute device, putting it
back on ``meta`` afterwards. The input embedding is never loaded whole: ``embedded(ids)`` gives
it only the rows of the calibration tokens (a 128k-token vocabulary is 0.8-1.6 GB, more than a
layer), and the output head is read in row blocks by ``head_nll``. So the resident memory is
one layer in the compute dtype plus the calibration activations, whatever the model's size.

Checkpoint tensors go where ``from_pretrained`` would put them: their names are mapped by
transformers' own weight-conversion rules for the family (renamings and converters, from
``get_model_conversion_mapping``). Most parameters are one checkpoint tensor each, read by
name. Where transformers builds a parameter from several tensors on load (mixture-of-experts
checkpoints store each expert's projections apart, Mixtral's ``experts.{j}.w1.weight``;
transformers 5 stacks them into ``experts.gate_up_proj`` / ``experts.down_proj``), loading layer
i reads only that layer's source tensors and runs the family's own ``WeightConverter`` on them,
so the layer is exactly what ``from_pretrained`` builds. Persistent buffers stored in the
checkpoint (DeepSeek-V3's expert-selection bias) are small and loaded once.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from secateurs.adapters import adapter_for
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.runinfo import return_freed_memory
from secateurs.session.base import Session
from secateurs.shards import (
    CheckpointReader,
    TensorSpec,
    checkpoint_dtype,
    row_blocks,
    saved_state,
    stored_tensors,
)

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


@dataclass
class CheckpointMap:
    """Where ``from_pretrained`` puts each tensor of a checkpoint, for one model.

    ``direct``: state-dict name (parameter or persistent buffer) → the checkpoint tensor that
    holds it. ``converted``: the first target name of each tensor a converter builds → its
    source tensors with the pattern each matched, in the order transformers collects them
    (natural key order, so expert 10 comes after expert 9). ``converters``: pattern → the
    family's converter (copied for each use: a converter collects tensors as it goes).
    """

    direct: dict[str, str] = field(default_factory=dict)
    converted: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))
    converters: dict[str, WeightConverter] = field(default_factory=dict)

    def converted_targets(self) -> set[str]:
        """Every name the converters build (a one-to-many converter builds several)."""
        names = set()
        for target, sources in self.converted.items():
            patterns = self.converters[sources[0][1]].target_patterns
            names |= {target.replace(patterns[0], pattern) for pattern in patterns}
        return names

    def convert(
        self,
        target: str,
        sources: list[tuple[str, str]],
        read: Callable[[str], torch.Tensor],
        model: PreTrainedModel,
    ) -> list[tuple[str, torch.Tensor]]:
        """Read ``target``'s source tensors and run the family's converter on them."""
        converter = copy.deepcopy(self.converters[sources[0][1]])
        for key, pattern in sources:  # a callable: read when the converter materialises it
            converter.add_tensor(target, key, pattern, partial(read, key))
        built = converter.convert(target, model=model, config=model.config)
        return [(name, v[0] if isinstance(v, list) else v) for name, v in built.items()]


def checkpoint_map(model: PreTrainedModel, keys: Iterable[str]) -> CheckpointMap:
    """Map checkpoint ``keys`` onto ``model``'s state dict as ``from_pretrained`` does: every
    matching renaming of the family, then at most one converter (transformers'
    ``rename_source_key``); keys with no place in the model are left out, with a warning."""
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    found = CheckpointMap(converters={p: c for c in converters for p in c.source_patterns})
    expected, prefix, unused = model.state_dict(), model.base_model_prefix, []
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:  # as transformers: keep the name
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            unused.append(key)
        elif pattern is None:
            found.direct[target] = key
        else:
            found.converted[target].append((key, pattern))
    if unused:
        log.warning("%d checkpoint tensors have no place in the model: %s", len(unused), unused[:3])
    return found


class Float32Linears(TorchFunctionMode):
    """Inside: a linear map whose weight is narrower than its float32 input (a 16-bit weight
    held by a lazy model) widens the weight for that call, a block of output rows at a time
    (a whole widened 14B MLP matrix would be 283 MB more). Widening is exact, so the outputs
    are those of the float32 layer; on a CPU without bfloat16 matrix units this is also ~7×
    faster than computing in bfloat16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            x, weight = args[0], args[1]
            if weight.dtype != x.dtype and x.dtype == torch.float32:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return _widened_linear(x, weight, bias)
        return func(*args, **kwargs)


WIDENED_BYTES = 64 * 2**20  # a widened weight block's size at most


def _widened_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    rows = max(1, WIDENED_BYTES // (4 * weight.shape[1]))
    if rows >= weight.shape[0]:
        return torch.nn.functional.linear(x, weight.to(x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        block_bias = None if bias is None else bias[part]
        out[..., part] = torch.nn.functional.linear(x, weight[part].to(x.dtype), block_bias)
    return out


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
        _check_not_quantized(self.config, source)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(  # a copy: from_config sets its
                copy.deepcopy(self.config),  # dtype to the compute dtype, not the stored one
                dtype=dtype,
                attn_implementation=attn_implementation,
            ).eval()
        self.model.tie_weights()  # as from_pretrained does: a tied head is the embedding
        self.model.requires_grad_(False)
        self.adapter = adapter_for(self.model)
        self.layers = self.adapter.layers(self.model)
        self.map = checkpoint_map(self.model, self.reader.names())
        self._metas: dict[str, torch.Tensor] | None = None
        self._check_converted()
        self.names = self._checkpoint_names()
        self.new_parameters: set[str] = set()  # added by surgery (zero biases): not on disk
        # Linear weights held as the checkpoint stores them (16-bit) and widened to the compute
        # dtype only inside each matmul (``Float32Linears``): half a float32 layer's memory, the
        # same numbers (widening is exact). Set by the session's opener for runs that read
        # weights only through matmuls and float64 copies (``stored_linears_allowed``).
        self.stored_linears = False
        self._load_resident()

    # --- names ---------------------------------------------------------------------------
    def _checkpoint_names(self) -> dict[str, str]:
        """Each parameter's (full) name → the checkpoint tensor that holds it (tied copies
        included), and each stored persistent buffer's; parameters a converter builds are
        checked to have their sources."""
        state = self.model.state_dict(keep_vars=True)
        stored = {id(state[target]): key for target, key in self.map.direct.items()}
        built = {id(state[t]) for t in self.map.converted_targets() if t in state}
        names, missing = {}, []
        for name, param in self.model.named_parameters(remove_duplicate=False):
            if id(param) in stored:
                names[name] = stored[id(param)]
            elif id(param) not in built:
                missing.append(name)
        if missing:
            raise ConfigError(
                f"{self.source}: parameters {missing[:3]} are not in the checkpoint "
                "(from_pretrained would leave them random); is the checkpoint complete?"
            )
        buffers = {name for name, _ in self.model.named_buffers()}
        return names | {n: key for n, key in self.map.direct.items() if n in buffers}

    def _check_converted(self) -> None:
        """Run every converter on the sources' meta tensors (shapes only, nothing read): each
        must build tensors of the model's shapes, so a missing or extra expert is found before
        any layer loads. Converted tensors outside the decoder layers are refused."""
        layers = self.adapter.layers_path + "."
        outside = sorted(t for t in self.map.converted if not t.startswith(layers))
        if outside:
            raise UnsupportedModelError(
                f"{self.source}: {outside[:3]} are converted from several checkpoint tensors "
                f"outside the decoder layers ({self.config.model_type}); layer-by-layer loading "
                "converts layer tensors only. Load this model in memory (no --sequential)."
            )
        state = self.model.state_dict()
        for target, sources in self.map.converted.items():
            for name, value in self.map.convert(target, sources, self.stored_meta, self.model):
                if name not in state or value.shape != state[name].shape:
                    keys = [key for key, _ in sources]
                    raise ConfigError(
                        f"{self.source}: {name} cannot be built from {len(keys)} checkpoint "
                        f"tensors ({keys[0]} …); is the checkpoint complete?"
                    )

    def stored_meta(self, name: str) -> torch.Tensor:
        """Checkpoint tensor ``name`` as a meta tensor of its dtype and shape; every file's
        header is read once (DeepSeek-V3 stores ~46k expert tensors in 163 shards)."""
        if self._metas is None:
            self._metas = _stored_metas(self.reader)
        return self._metas[name]

    def layer_prefix(self, index: int) -> str:
        return f"{self.adapter.layers_path}.{index}."

    def _is_big(self, name: str) -> bool:
        big = {id(self.model.get_input_embeddings().weight)}
        head = self.model.get_output_embeddings()
        if head is not None:
            big.add(id(head.weight))
        return id(self.model.get_parameter(name)) in big

    # --- loading -------------------------------------------------------------------------
    def held_dtype(self, module: nn.Module, name: str, full: str) -> torch.dtype:
        """The dtype parameter ``name`` of ``module`` (``full``: its whole name) is held in:
        the compute dtype, or its stored 16-bit dtype for a Linear weight under
        ``stored_linears``."""
        if not self.stored_linears or not name.endswith("weight"):
            return self.dtype
        owner = module.get_submodule(name.rpartition(".")[0])
        stored = self.stored_meta(self.names[full]).dtype if full in self.names else self.dtype
        narrow = stored in (torch.float16, torch.bfloat16) and self.dtype == torch.float32
        return stored if narrow and isinstance(owner, nn.Linear) else self.dtype

    def computing(self) -> contextlib.AbstractContextManager:
        """Where loaded layers run: with ``stored_linears``, their matmuls widen the weights."""
        return Float32Linears() if self.stored_linears else contextlib.nullcontext()

    def put(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """``value`` as parameter ``name`` of ``module``, on the device, in its own dtype."""
        set_module_tensor_to_device(module, name, self.device, value=value, dtype=value.dtype)

    def _read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.reader.read(key).to(dtype or self.dtype)

    def _load(self, module: nn.Module, prefix: str) -> None:
        """The one-to-one parameters of ``module`` (named ``prefix``…), then those that the
        family's converters build from several tensors."""
        for name, param in list(module.named_parameters()):
            full = prefix + name
            if full in self.new_parameters:
                value = torch.zeros(param.shape, dtype=self.dtype)
            elif full in self.names:
                value = self._read(self.names[full], self.held_dtype(module, name, full))
            else:
                continue  # converted below
            self.put(module, name, value)
        for target, sources in self.map.converted.items():
            if target.startswith(prefix):
                for name, value in self.map.convert(target, sources, self._read, self.model):
                    set_module_tensor_to_device(self.model, name, self.device, value=value)
        unloaded = [prefix + n for n, p in module.named_parameters() if p.is_meta]
        if unloaded:
            raise ConfigError(f"{self.source}: {unloaded[:3]} were not built from the checkpoint.")

    def _load_resident(self) -> None:
        """Everything outside the decoder layers but the input embedding and output head, and
        the persistent buffers stored in the checkpoint (in their own dtype, as transformers)."""
        layers = self.adapter.layers_path + "."
        for name, _ in list(self.model.named_parameters()):
            if not name.startswith(layers) and not self._is_big(name):
                value = self._read(self.names[name])
                set_module_tensor_to_device(self.model, name, self.device, value=value)
        buffers = dict(self.model.named_buffers())
        for name, key in self.names.items():
            if name in buffers:
                value = self._read(key, buffers[name].dtype)
                set_module_tensor_to_device(self.model, name, self.device, value=value)

    def load_layer(self, index: int) -> nn.Module:
        self._load(self.layers[index], self.layer_prefix(index))
        return self.layers[index]

    def release_layer(self, index: int) -> None:
        layer = self.layers[index]
        for name, _ in list(layer.named_parameters()):
            set_module_tensor_to_device(layer, name, "meta")
        return_freed_memory()

    def converted_as_saved(self, index: int) -> dict[str, torch.Tensor]:
        """The converter-built parameters of loaded layer ``index`` as ``save_pretrained``
        writes them (transformers' reverse conversion: experts one by one again), on the CPU
        in their checkpoint tensors' dtype. Empty where the layer has none."""
        prefix, direct = self.layer_prefix(index), self.names.keys() | self.new_parameters
        built = {
            name: param.detach()
            for name, param in self.model.named_parameters()
            if name.startswith(prefix) and name not in direct
        }
        saved = revert_weight_conversion(self.model, built) if built else {}
        stored = self.reader.names()
        return {
            name: tensor.to("cpu", self.stored_meta(name).dtype if name in stored else tensor.dtype)
            for name, tensor in saved.items()
        }

    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        """Layer ``index`` with real weights inside the block, back on ``meta`` after it."""
        try:
            with self.computing():
                yield self.load_layer(index)
        finally:
            self.release_layer(index)

    def layer_as_saved(self, index: int) -> dict[str, torch.Tensor]:
        """Loaded layer ``index``'s tensors as the checkpoint stores them: each parameter and
        stored buffer in its checkpoint tensor's dtype (a parameter the cut added: the
        checkpoint's dtype), converter-built ones as ``save_pretrained`` writes them."""
        prefix, layer = self.layer_prefix(index), self.layers[index]
        stored = [(n, b) for n, b in layer.named_buffers() if prefix + n in self.names]
        built = self.map.converted_targets()
        tensors = {}
        for name, param in [*layer.named_parameters(), *stored]:
            full = prefix + name
            if full in built:
                continue  # written as saved, below
            key = self.names.get(full)
            dtype = self.reader.meta(key).dtype if key else checkpoint_dtype(self.config)
            tensors[full] = param.detach().to("cpu", dtype).contiguous()
        return tensors | {n: t.contiguous() for n, t in self.converted_as_saved(index).items()}

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
        states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].reshape(-1).to(self.device)
        lse = torch.full((len(states),), -math.inf, dtype=torch.float64, device=self.device)
        picked = torch.zeros(len(states), dtype=torch.float64, device=self.device)
        for start, logits in self._head_blocks(states):
            rows = logits.shape[-1]
            lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-1))
            inside = (targets >= start) & (targets < start + rows)
            local = (targets - start).clamp(0, rows - 1)
            picked += torch.where(inside, logits.gather(1, local[:, None])[:, 0], 0.0)
        return (lse - picked).reshape(ids.shape[0], -1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) from final hidden states, the head read in row blocks (float32)."""
        states = hidden.reshape(-1, hidden.shape[-1])
        parts = [logits.float() for _, logits in self._head_blocks(states)]
        return torch.cat(parts, dim=-1).reshape(*hidden.shape[:-1], -1)

    def _head_blocks(self, states: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(first vocabulary row, float64 logits of ``states`` for the rows of one block)."""
        head = self.model.get_output_embeddings()
        name = self.names[_param_name(self.model, head.weight)]
        bias = getattr(head, "bias", None)
        bias_name = None if bias is None else self.names[_param_name(self.model, bias)]
        states = states.to(self.device, self.dtype)
        start = 0
        for block in self.reader.blocks(name, self._head_block_bytes(name, len(states))):
            logits = states @ block.to(self.device, self.dtype).T
            if bias_name is not None:
                logits += self.reader.read(bias_name)[start : start + len(block)].to(logits)
            yield start, self._transform(logits).to(torch.float64)
            start += len(block)

    def _head_block_bytes(self, name: str, positions: int) -> int:
        """Head rows read at a time: their logits for ``positions`` tokens (float32 and the
        float64 copy) and their weights in the compute dtype each take at most
        ``_LOGITS_BYTES`` (1016 positions × 29k rows of logits were 0.36 GB at SmolLM2's size;
        126 positions sized by logits alone were 44k rows of a 3B head: 0.54 GB of weights)."""
        stored = self.reader.meta(name)
        by_logits = _LOGITS_BYTES // (12 * max(1, positions))
        by_weights = _LOGITS_BYTES // (4 * stored.shape[-1])  # the block's compute-dtype copy
        rows = max(1, min(by_logits, by_weights))
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


def _stored_metas(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    return {name: reader.meta(name) for name in reader.files}


def _check_not_quantized(config: Any, source: Any) -> None:
    """Quantized checkpoints (FP8 blocks with scales, GPTQ, AWQ ...) hold codes, not weights:
    read as floats they would be silently wrong. transformers dequantizes them through its
    quantizers, which this path does not run."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "?") if isinstance(quantization, dict) else "?"
        raise UnsupportedModelError(
            f"{source} is a quantized checkpoint ({method}); layer-by-layer loading reads "
            "floating-point weights only. Dequantize it first (load and save it in bf16), or "
            "prune in memory (no --sequential)."
        )


def _param_name(model: nn.Module, param: torch.Tensor) -> str:
    for name, candidate in model.named_parameters(remove_duplicate=False):
        if candidate is param:
            return name
    raise ConfigError("A head/embedding parameter is not registered in the model.")


def check_plain_source(source: str | os.PathLike) -> None:
    """Refuse a checkpoint whose shapes only secateurs.json describes (removed branches,
    per-layer widths or experts): its config alone cannot build the skeleton to read it."""
    from secateurs.checkpoint import recorded_structure

    kinds = recorded_structure(source)
    if kinds:
        raise ConfigError(
            f"{source} has secateurs structure ({', '.join(kinds)}) that its config cannot "
            "express; layer-by-layer reading needs a plain checkpoint. Load it with "
            "secateurs.load_model and prune in memory."
        )


class LazySession(Session):
    """The lazy session: a ``LazyModel`` whose layers are read from disk one at a time.

    A layer changed while loaded (cut, re-fitted) is spilled to a file of ``work`` as it is
    released, and read back from there if loaded again; the writer takes it from there, and
    every unchanged tensor from the source checkpoint."""

    kind = "sequential"

    def __init__(
        self, lazy: LazyModel, work: str | os.PathLike, tokenizer: Any = None, stream: bool = False
    ) -> None:
        super().__init__(lazy.model, lazy.adapter, tokenizer, lazy.source)
        self.lazy = lazy
        self.kind = "stream" if stream else "sequential"
        self.spill = Path(work)
        self.work = self.spill.parent
        self.spilled: dict[int, Path] = {}

    @property
    def device(self) -> torch.device:
        return self.lazy.device

    @contextmanager
    def loaded(self, index: int) -> Iterator[nn.Module]:
        self.lazy.new_parameters |= self._added_parameters()
        layer = self._load(index)
        try:
            with self.lazy.computing():
                yield layer
            if index in self.modified:
                self._spill(index)
        finally:
            self.lazy.release_layer(index)

    def _load(self, index: int) -> nn.Module:
        if index not in self.spilled:
            return self.lazy.load_layer(index)
        layer, prefix = self.lazy.layers[index], self.lazy.layer_prefix(index)
        stored = stored_tensors(self.spilled[index])
        for name, _ in list(layer.named_parameters()):
            dtype = self.lazy.held_dtype(layer, name, prefix + name)
            self.lazy.put(layer, name, stored[prefix + name].read().to(dtype))
        return layer

    def _added_parameters(self, kept: tuple[int, ...] | None = None) -> set[str]:
        """Parameters the cut added (zero biases): not in the checkpoint, created as zeros.
        ``kept``: after blocks were dropped, the original index of each layer."""
        built, prefix = self.lazy.map.converted_targets(), self.adapter.layers_path + "."
        added = set()
        for name, _ in self.model.named_parameters():
            original = name if kept is None else _renumbered(name, prefix, kept)
            if original not in self.lazy.names and original not in built:
                added.add(name)
        return added

    def _spill(self, index: int) -> None:
        """Layer ``index``'s tensors, in the checkpoint's dtypes, to a file of its own."""
        self.spill.mkdir(parents=True, exist_ok=True)
        path = self.spill / f"{index}.safetensors"
        save_file(self.lazy.layer_as_saved(index), path)
        self.spilled[index] = path

    @contextmanager
    def embedded(self, ids: torch.Tensor) -> Iterator[torch.Tensor]:
        with self.lazy.embedded(ids) as compact:
            yield compact.to(self.device)

    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.lazy.logits(self.final_states(ids, hidden))

    def token_nll(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        return self.lazy.token_nll(self.final_states(ids, hidden), ids)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.spill, ignore_errors=True)

    def freed_while_writing(self) -> int:
        """Each spilled layer is deleted once copied (``output_tensors``): at worst all but
        the largest are gone by the time the output holds them."""
        sizes = [path.stat().st_size for path in self.spilled.values() if path.exists()]
        return sum(sizes) - max(sizes, default=0)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.kind,
            "compute_dtype": str(self.lazy.dtype).removeprefix("torch."),
            "linear_weights_held": "as stored" if self.lazy.stored_linears else "compute dtype",
            "device": str(self.lazy.device),
            **self.notes,
        }

    # --- the writer's view ---------------------------------------------------------------------
    def output_tensors(self, kept: tuple[int, ...]) -> tuple[dict[str, TensorSpec], Callable]:
        """The pruned (meta) model's tensors as ``save_pretrained`` names them, and a reader
        giving each from its spilled layer or the source checkpoint (in row blocks); a zero
        bias the cut added to a layer it left as it was is written as zeros."""
        named = [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers()]
        module_name = {id(p): n for n, p in named}
        prefix = self.adapter.layers_path + "."
        spilled, added = _spill_map(self.spilled.values()), self._added_parameters(kept)
        where: dict[str, tuple[str, str]] = {}
        specs: dict[str, TensorSpec] = {}
        for name, tensor in saved_state(self.model).items():
            current = module_name.get(id(tensor), name)
            if current in added and _renumbered(current, prefix, kept) not in spilled:
                where[name] = ("zeros", current)
            else:
                full = _renumbered(current, prefix, kept)
                where[name] = self._location(full, _renumbered(name, prefix, kept), spilled)
            meta = self._meta(*where[name])
            specs[name] = TensorSpec(name, meta.dtype, tuple(meta.shape))
        unread = Counter(file for file, _ in where.values() if file not in ("source", "zeros"))

        def blocks(name: str) -> Iterator[torch.Tensor]:
            yield from self._blocks(*where[name])
            file = where[name][0]
            if file in unread:  # a spilled layer is deleted once written: while the output
                unread[file] -= 1  # is written, each changed layer is on disk once, not twice
                if unread[file] == 0:
                    Path(file).unlink(missing_ok=True)

        return specs, blocks

    def _location(self, full: str, original: str, spilled: dict[str, Path]) -> tuple[str, str]:
        for key in (full, original):
            if key in spilled:
                return str(spilled[key]), key
        if full in self.lazy.names:
            return "source", self.lazy.names[full]
        if original in self.lazy.reader.files:
            return "source", original
        raise ConfigError(f"{full}: found neither in a spilled layer nor in {self.source}.")

    def _meta(self, file: str, key: str) -> torch.Tensor:
        if file == "source":
            return self.lazy.reader.meta(key)
        if file == "zeros":
            shape = self.model.get_parameter(key).shape
            return torch.empty(shape, dtype=checkpoint_dtype(self.lazy.config), device="meta")
        stored = stored_tensors(file)[key]
        return torch.empty(stored.shape, dtype=stored.dtype, device="meta")

    def _blocks(self, file: str, key: str) -> Iterator[torch.Tensor]:
        if file == "source":
            yield from self.lazy.reader.blocks(key)
            return
        if file == "zeros":
            yield torch.zeros_like(self._meta(file, key), device="cpu")
            return
        yield from row_blocks(stored_tensors(file)[key])


def _renumbered(name: str, prefix: str, kept: tuple[int, ...]) -> str:
    """``name`` of the pruned model in the original model's layer numbering."""
    if not name.startswith(prefix):
        return name
    index, rest = name[len(prefix) :].split(".", 1)
    return f"{prefix}{kept[int(index)]}.{rest}"


def _spill_map(files: Iterable[Path]) -> dict[str, Path]:
    found = {}
    for path in files:
        found.update(dict.fromkeys(stored_tensors(path), path))
    return found
