"""Prune a checkpoint that need not fit in memory: score layer by layer, stream the surgery.

    from secateurs import sequential_prune
    sequential_prune("path/to/llama-70b", "runs/d8", unit="block", criterion="block-influence",
                     remove=8)
    sequential_prune("path/to/llama-70b", "runs/w20", unit="width", criterion="fluctuation",
                     width=WidthOptions(ratio=0.2))

Scoring runs the criterion's own code through ``SequentialPipeline`` (one layer on the device
at a time; ``ppl`` advances every candidate's stream in lockstep). Depth plans are then written
by ``stream_depth_prune``; width plans by ``stream_width_prune`` below: each layer is read,
pruned (re-fitted by reconstruction on the already-pruned model's activations, or compensated,
or sliced), spilled to a per-layer file, and the output shards are assembled from those files
and the untouched source tensors. The output equals what the in-memory path saves.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from secateurs.api import CriterionSpec, ScoreResult, depth_record, plan_from_scores
from secateurs.checkpoint import RECORD_FILE, mark_config, structure_record, write_json
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.criteria.base import Layerwise
from secateurs.criteria.mini_llm import MiniLLM
from secateurs.criteria.ppl import Perplexity
from secateurs.data import CalibrationConfig
from secateurs.errors import ConfigError
from secateurs.lazy import LazyModel
from secateurs.outputs import atomic_directory, check_output_dir
from secateurs.pipeline import SequentialPipeline, capture_calls
from secateurs.plan import Plan, parse_protected
from secateurs.reconstruct import Refitter, prepare_intercepts
from secateurs.runinfo import calibration_tokens as _calibration
from secateurs.runinfo import count_parameters, peak_rss_mb, return_freed_memory
from secateurs.streaming import (
    CheckpointReader,
    TensorSpec,
    _checkpoint_dtype,
    _copy_tokenizer,
    _write_config,
    saved_state,
    stream_depth_prune,
    write_safetensors,
)
from secateurs.surgery import apply_plan, cut_layer, prepare_compensation
from secateurs.width import update_config, widths
from secateurs.width_api import (
    WidthOptions,
    _checked_scorer,
    _compensating,
    _fit_calibration,
    _plan,
    criterion_details,
    parameter_base,
    width_record,
)

log = logging.getLogger(__name__)


def sequential_criterion(name: str, units: tuple[str, ...], **options: Any):
    """The criterion ``name``, if it can be computed layer by layer; else a clear refusal."""
    scorer = CRITERIA.get(CRITERIA.canonical(name.rstrip("+")))(**options)
    if not isinstance(scorer, SEQUENTIAL):
        raise ConfigError(
            f"Criterion {scorer.name!r} needs the whole model in memory (a backward pass); "
            "layer-by-layer criteria: "
            f"{', '.join(sorted(layerwise_criteria()))}."
        )
    for unit in units:
        if unit not in scorer.units:
            raise ConfigError(f"Criterion {scorer.name!r} cannot score {unit!r} units.")
    return scorer


# computed from what each layer shows, or from the losses of perturbed models (every stream
# advanced in lockstep: ``SequentialPipeline.perturbed_losses``)
SEQUENTIAL = Layerwise | Perplexity | MiniLLM


def layerwise_criteria() -> list[str]:
    return [n for n in CRITERIA.names() if issubclass(CRITERIA.get(n), SEQUENTIAL)]


@dataclass(frozen=True)
class _Data:
    """Where calibration comes from and how it is batched (shared by scoring and fitting)."""

    source: Path
    calibration: CalibrationConfig | torch.Tensor | None
    data_root: str | os.PathLike | None
    batch_size: int
    progress: bool
    offload: str | os.PathLike | None = None
    work: Path | None = None  # where a temporary offload folder may go (beside the output)

    def tokens(self, calibration: Any = None) -> tuple[torch.Tensor, dict | None]:
        calibration = self.calibration if calibration is None else calibration
        tokenizer = None
        if not isinstance(calibration, torch.Tensor):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(self.source)
        tokens = _calibration(True, calibration, tokenizer, self.data_root)
        del tokenizer
        return_freed_memory()  # the tokenizer's and documents' heap, before any layer loads
        return tokens


def sequential_prune(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    unit: str = "block",
    criterion: str = "block-influence",
    remove: int | None = None,
    protect: str | tuple[int, ...] | None = "sl",
    width: WidthOptions | None = None,
    calibration: CalibrationConfig | torch.Tensor | None = None,
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
    progress: bool = True,
    offload_dir: str | os.PathLike | None = None,
    **criterion_options: Any,
) -> dict[str, Any]:
    """Score ``source`` one layer at a time and write the pruned checkpoint to ``out``.

    Depth: ``unit="block"`` with ``remove`` blocks. Width: ``unit`` in heads/channels/width with
    ``width`` options. Returns the record saved as ``secateurs.json``. ``offload_dir``: where
    ``ppl``'s candidate streams are kept (default: in memory unless they would take more than a
    quarter of the available memory, then a temporary folder beside ``out``).
    """
    check_output_dir(out, overwrite)
    work = Path(out).resolve().parent
    data = _Data(Path(source), calibration, data_root, batch_size, progress, offload_dir, work)
    if unit in ("attn", "mlp"):
        raise ConfigError("Branch removal changes module types: use the in-memory path.")
    if unit == "block":
        if remove is None or remove < 1:
            raise ConfigError("Sequential depth pruning needs the number of blocks: remove=N.")
        scorer = sequential_criterion(criterion, ("block",), **criterion_options)
        lazy = LazyModel(source, dtype, device, attn_implementation)
        return _depth(lazy, out, scorer, remove, parse_protected(protect), data, overwrite)
    opts = replace(width or WidthOptions(), unit=unit, sensitivity=False)
    scorer = sequential_criterion(criterion, opts.kinds, **criterion_options)
    lazy = LazyModel(source, dtype, device, attn_implementation)
    _checked_scorer(lazy.model, lazy.adapter, criterion, opts, criterion_options)
    return _width(lazy, out, scorer, opts, data, overwrite)


def _score(lazy: LazyModel, scorer, kinds, tokens, data: _Data) -> tuple[dict, ScoringContext]:
    """Scores per unit kind, computed one layer at a time (data-free: no forward at all)."""
    temporary = None
    if tokens is None:
        pipeline: Any = _DataFree(lazy)
    else:
        temporary = None if data.offload else _offload_if_needed(scorer, lazy, tokens, data)
        offload = data.offload or temporary
        pipeline = SequentialPipeline(lazy, tokens, data.batch_size, data.progress, offload)
    ctx = ScoringContext(
        lazy.model, lazy.adapter, tokens, data.batch_size, (), data.progress, {}, pipeline
    )
    width = ("heads", "channels")
    try:
        scores = {
            k: scorer.score_width(ctx, k) if k in width else scorer.score(ctx, k) for k in kinds
        }
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return scores, ctx


def _offload_if_needed(scorer, lazy: LazyModel, tokens: torch.Tensor, data: _Data) -> Any:
    """A temporary folder for the perturbed streams (``ppl``, ``mini-llm``) when, in memory,
    they would take more than a quarter of the memory available now; None otherwise."""
    from secateurs.lazy import available_memory

    count = _stream_count(scorer, len(lazy.layers))
    if count == 0:
        return None
    itemsize = torch.empty((), dtype=lazy.dtype).element_size()
    stream = tokens.numel() * lazy.config.hidden_size * itemsize
    need = stream * count
    if need <= available_memory() / 4:
        return None
    folder = Path(tempfile.mkdtemp(prefix=".secateurs-streams-", dir=data.work))
    log.info("%s streams need %.1f GB: kept in %s", scorer.name, need / 2**30, folder)
    return folder


def _stream_count(scorer, num_layers: int) -> int:
    """Perturbed streams held at once: one per candidate layer (``ppl``), one per SPSA run."""
    if isinstance(scorer, Perplexity):
        return num_layers
    if isinstance(scorer, MiniLLM):
        return scorer.stream_count(num_layers)
    return 0


class _DataFree:
    """A pipeline for criteria that read weights only: load each layer, score it."""

    def __init__(self, lazy: LazyModel) -> None:
        self.lazy = lazy

    def layer_scores(self, criterion, ctx, kind) -> list[torch.Tensor]:
        scores = []
        for index in range(len(self.lazy.layers)):
            with self.lazy.loaded(index):
                scores.append(criterion.layer_score(ctx, kind, index, None))
        return scores


def _depth(lazy: LazyModel, out, scorer, remove: int, protected, data: _Data, overwrite) -> dict:
    tokens, calib = data.tokens() if scorer.needs_calibration else (None, None)
    start = time.perf_counter()
    values = _score(lazy, scorer, ("block",), tokens, data)[0]["block"]
    seconds = time.perf_counter() - start
    result = ScoreResult(
        scorer.name, "block", tuple(values.tolist()), scorer.options(), calib, seconds
    )
    plan = plan_from_scores(result, len(lazy.layers), remove, protected)
    before = count_parameters(lazy.model)
    apply_plan(lazy.model, plan, lazy.adapter)
    spec = CriterionSpec(scorer.name, plan.protected)
    record = depth_record(
        lazy.model, plan, spec, [result], False, before, seconds, str(data.source)
    )
    record["pipeline"] = pipeline_record(lazy, data.batch_size)
    stream_depth_prune(data.source, plan, out, record, overwrite=overwrite)
    return _saved_record(out)


def pipeline_record(lazy: LazyModel, batch_size: int) -> dict[str, Any]:
    return {
        "name": SequentialPipeline.name,
        "compute_dtype": str(lazy.dtype).removeprefix("torch."),
        "device": str(lazy.device),
        "batch_size": batch_size,
    }


def _saved_record(out) -> dict[str, Any]:
    from secateurs.checkpoint import read_record

    return read_record(out)


def _width(lazy: LazyModel, out, scorer, opts: WidthOptions, data: _Data, overwrite) -> dict:
    model, adapter = lazy.model, lazy.adapter
    layers = opts.layer_range(len(lazy.layers))
    compensating = _compensating(scorer, opts) and not opts.reconstructing
    needs_data = scorer.needs_calibration or compensating or opts.reconstructing
    tokens, calib = data.tokens() if needs_data else (None, None)
    base, before = parameter_base(model, opts.include_embeddings), count_parameters(model)
    start = time.perf_counter()
    scored = tokens if scorer.needs_calibration or compensating else None
    scores, ctx = _score(lazy, scorer, opts.kinds, scored, data)
    seconds = time.perf_counter() - start
    if compensating and "input_mean" not in ctx.extras:
        raise ConfigError(f"{scorer.name} leaves no input means: use reconstruction instead.")
    target = round(opts.ratio * base)
    plan = _plan(model, adapter, scores, opts, layers, target, scorer, compensating, None)
    fit = data.tokens(_fit_calibration(data.calibration, opts))[0] if opts.reconstructing else None
    details = criterion_details(ctx.extras)
    pipeline = pipeline_record(lazy, data.batch_size)

    def describe(pruned: PreTrainedModel) -> dict[str, Any]:
        counts = (before, base, seconds)
        args = (pruned, plan, scorer, opts, scores, calib, counts, str(data.source), details)
        return width_record(*args, pipeline=pipeline)

    means = ctx.extras.get("input_mean", {}) if plan.compensate else {}
    stream_width_prune(lazy, plan, out, describe, opts, fit, means, overwrite, data.progress)
    return _saved_record(out)


# --- streaming width surgery -------------------------------------------------------------------
def stream_width_prune(
    lazy: LazyModel,
    plan: Plan,
    out: str | os.PathLike,
    describe: Callable[[PreTrainedModel], dict[str, Any]],
    opts: WidthOptions,
    fit_tokens: torch.Tensor | None = None,
    means: dict[str, list[torch.Tensor]] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Cut ``plan`` out of ``lazy``'s checkpoint layer by layer into ``out``; ``describe``
    gives the record of the pruned (meta) model."""
    start = time.perf_counter()
    model, adapter = lazy.model, lazy.adapter
    original = widths(model, adapter)[0]
    refitter = _prepare(lazy, plan, opts, fit_tokens, means)

    def cut(index: int) -> None:
        if refitter is not None:
            refitter.layer(model, adapter, plan, index)
        else:
            cut_layer(model, adapter, plan, index, means)

    def complete(record: dict[str, Any], plain: bool) -> None:
        record["reconstruction"] = _reconstruction_record(refitter, fit_tokens)
        record["parameters"]["plain_config"] = plain
        record.setdefault("timings", {})["surgery_s"] = round(time.perf_counter() - start, 3)

    update = lambda: update_config(model, adapter, original)  # noqa: E731
    stream_surgery(lazy, out, cut, update, describe, complete, overwrite, progress)
    return Path(out)


def stream_surgery(
    lazy: LazyModel,
    out: str | os.PathLike,
    cut: Callable[[int], None],
    update_config: Callable[[], Any],
    describe: Callable[[PreTrainedModel], dict[str, Any]],
    complete: Callable[[dict[str, Any], Any], None] | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """The streamed write shared by width and expert pruning: each layer loaded, ``cut``
    (index) and spilled to disk; then the config (``update_config()``, its result handed to
    ``complete``), the weights in the checkpoint's layout, the tokenizer and the record
    (``describe(model)`` + structure, completed by ``complete(record, updated)``), atomically.
    Returns the record saved."""
    model = lazy.model
    with atomic_directory(out, overwrite=overwrite, needed=_output_bytes(lazy)) as tmp:
        spill = tmp / ".layers"
        spill.mkdir()
        for index in tqdm(range(len(lazy.layers)), "surgery", disable=not progress, leave=False):
            with lazy.loaded(index):
                cut(index)
                _spill_layer(lazy, index, spill)
        updated = update_config()
        model.config.dtype = _checkpoint_dtype(lazy.config)
        _write_config(model, lazy.source, tmp)
        _write_weights(lazy, CheckpointReader(lazy.source), spill, tmp)
        shutil.rmtree(spill)
        _copy_tokenizer(lazy.source, tmp)
        record = {**describe(model), **structure_record(model), "streamed": True}
        if not record["loading"]["plain_transformers"]:
            mark_config(tmp)
        if complete is not None:
            complete(record, updated)
        record.setdefault("timings", {})["peak_rss_mb"] = round(peak_rss_mb(), 1)
        write_json(tmp / RECORD_FILE, record)
    return record


def _prepare(lazy: LazyModel, plan: Plan, opts: WidthOptions, fit_tokens, means):
    """Zero biases where reconstruction fits an intercept or compensation adds one (new
    parameters: not on disk, the lazy model creates them as zeros when a layer loads), and the
    ``Refitter`` fed from the lazy model's cached calls (None without reconstruction)."""
    model, adapter = lazy.model, lazy.adapter
    known = {name for name, _ in model.named_parameters()}
    if fit_tokens is None:
        prepare_compensation(model, adapter, plan, means)
    else:
        kinds = [k for k in ("heads", "channels") if any(plan.removed(k))]
        fits = prepare_intercepts(model, adapter, kinds, opts.compensate is not False)
    lazy.new_parameters |= {n for n, _ in model.named_parameters()} - known
    if fit_tokens is None:
        return None
    step = 8  # as width_api.reconstruct_plan batches the fit
    batches = [fit_tokens[i : i + step] for i in range(0, len(fit_tokens), step)]
    return Refitter(capture_calls(lazy, batches), opts.reconstruct_damping, fits)


def _reconstruction_record(refitter: Refitter | None, fit_tokens) -> dict[str, Any]:
    if refitter is None:
        return {"enabled": False}
    return {"enabled": True, "samples": len(fit_tokens), **refitter.finish().to_dict()}


def _spill_layer(lazy: LazyModel, index: int, spill: Path) -> None:
    """Layer ``index``'s tensors, in the checkpoint's dtype, to a file of its own."""
    prefix = lazy.layer_prefix(index)
    tensors = {}
    layer = lazy.layers[index]
    stored_buffers = [(n, b) for n, b in layer.named_buffers() if prefix + n in lazy.names]
    for name, param in [*layer.named_parameters(), *stored_buffers]:
        full = prefix + name
        stored = lazy.names.get(full)
        if stored is None and full not in lazy.new_parameters:
            continue  # built by a converter (stacked experts): spilled as saved, below
        dtype = (
            lazy.reader.meta(stored).dtype
            if stored and full not in lazy.new_parameters
            else (_checkpoint_dtype(lazy.config))
        )
        tensors[full] = param.detach().to("cpu", dtype).contiguous()
    tensors |= {n: t.contiguous() for n, t in lazy.converted_as_saved(index).items()}
    save_file(tensors, spill / f"{index}.safetensors")


def _output_bytes(lazy: LazyModel) -> int:
    from secateurs.lazy import checkpoint_bytes_on_disk

    return int(checkpoint_bytes_on_disk(lazy.source) * 1.05) + (20 << 20)


def _write_weights(lazy: LazyModel, reader: CheckpointReader, spill: Path, tmp: Path) -> None:
    """Output shards in ``save_pretrained``'s names, order and sharding."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from secateurs.streaming import DEFAULT_SHARD, INDEX_FILE

    model = lazy.model
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]
    module_name = {id(p): n for n, p in tensors}
    state = saved_state(lazy.model)
    layers = CheckpointReader.__new__(CheckpointReader)
    layers.directory, layers.files = spill, _spill_map(spill)
    source: dict[str, tuple[CheckpointReader, str]] = {}
    specs: dict[str, TensorSpec] = {}
    for name, tensor in state.items():
        full = module_name.get(id(tensor), name)  # not a module's: a reverted conversion
        where = (layers, full) if full in layers.files else (reader, lazy.names[full])
        source[name] = where
        meta = where[0].meta(where[1])
        specs[name] = TensorSpec(name, meta.dtype, tuple(meta.shape))
    sized = {n: torch.empty(s.shape, dtype=s.dtype, device="meta") for n, s in specs.items()}
    split = split_torch_state_dict_into_shards(
        sized, filename_pattern="model{suffix}.safetensors", max_shard_size=DEFAULT_SHARD
    )
    for filename, names in split.filename_to_tensors.items():
        write_safetensors(
            tmp / filename,
            [specs[n] for n in names],
            lambda n: source[n][0].blocks(source[n][1]),
            {"format": "pt"},
        )
    if split.is_sharded:
        import json

        index = {
            "metadata": {"total_parameters": lazy.model.num_parameters(), **split.metadata},
            "weight_map": split.tensor_to_filename,
        }
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _spill_map(spill: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for path in spill.glob("*.safetensors"):
        with safe_open(path, framework="pt") as handle:
            files.update({name: path for name in handle.keys()})  # noqa: SIM118
    return files
