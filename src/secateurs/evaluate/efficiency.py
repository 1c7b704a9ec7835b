"""Efficiency: parameters, MACs, weight memory, and generation latency / throughput / peak memory.

Protocol (Shortened LLaMA): greedy generation of exactly ``new_tokens`` tokens
(``min_new_tokens = max_new_tokens``, so every model does the same work) after a short prompt,
at several batch sizes; warm-up runs, then repeats whose median is reported. Several models are
measured in the same process, interleaved (every repeat visits every model, in rotated order),
so slow drifts of a shared machine hit all of them alike and ratios stay fair.

Peak memory is "weights + the largest extra memory held during ``generate``":
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call (tensor bytes).
- CPU (Linux): the kernel's resident high-water mark (``VmHWM``), reset before each run through
  ``/proc/self/clear_refs`` (value 5), minus the resident size before the run. Freed heap is first
  returned to the OS (``malloc_trim``) so memory cached by earlier runs cannot hide this run's
  peak. It is process-level, so it includes allocator overhead and temporary buffers that a
  tensor count would miss; it is ``None`` where the kernel interface is unavailable.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from secateurs.errors import ConfigError
from secateurs.evaluate.bench_protocol import BenchConfig
from secateurs.plan import RECORD_KEYS, SL_PROTECTED, Plan, resolve_protected
from secateurs.positions import check_generation
from secateurs.runinfo import count_parameters

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
MB = 1024 * 1024


# --- static counts ------------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    """Bytes of unique parameters and buffers (what loading the weights costs)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def linear_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of every ``nn.Linear`` (decoder + LM head).

    Read from the modules' shapes, so removed blocks or branches and narrowed layers count
    exactly. Stacked MoE experts count top-k experts per token (plus the router). Attention
    scores (QKᵀ, AV) are not weights: see ``attention_macs``.
    """
    from secateurs.units.experts import routed_expert_macs

    linear = sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)
    )
    return linear + routed_expert_macs(model)


def _heads(config: PretrainedConfig) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def config_macs_per_token(config: PretrainedConfig) -> int:
    """Weight MACs per token of a LLaMA-style decoder, analytic from its config.

    Per layer: q, k, v, o projections (GQA: k and v have ``kv_heads`` heads) and a gated MLP
    (gate, up, down); plus the LM head. Embedding lookups are not MACs.
    """
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv_heads, head_dim = _heads(config)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * inter
    return layers * (attention + mlp) + hidden * config.vocab_size


def attention_macs(config: PretrainedConfig, query_len: int, key_len: int) -> int:
    """MACs of QKᵀ and AV for ``query_len`` queries over ``key_len`` keys, all layers (B = 1).

    Eager attention computes the full (query_len × key_len) score matrix even when causal.
    """
    heads, _, head_dim = _heads(config)
    return config.num_hidden_layers * 2 * heads * head_dim * query_len * key_len


@dataclass(frozen=True)
class ModelStats:
    parameters: int
    macs_per_token: int
    weight_mb: float
    num_layers: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelStats:
        return cls(
            count_parameters(model),
            linear_macs_per_token(model),
            weight_bytes(model) / MB,
            int(model.config.num_hidden_layers),
        )


# --- random-weight models of real shapes --------------------------------------------------------


def random_config(name_or_path: str) -> PretrainedConfig:
    """A config from ``configs/NAME.json`` (e.g. ``llama-7b``, ``smollm2-135m``) or a JSON file."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ConfigError(f"No config {name_or_path!r}: not a JSON file nor one of {known}.")
    values = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def random_model(
    config: PretrainedConfig, dtype: torch.dtype = torch.float32, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised model of ``config``'s shape (for speed only: outputs are noise)."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def depth_plan(num_layers: int, remove: int, protected: Sequence[int] = SL_PROTECTED) -> Plan:
    """Remove the ``remove`` last unprotected blocks: speed depends on how many, not which."""
    keep_safe = set(resolve_protected(protected, num_layers))
    candidates = [i for i in range(num_layers) if i not in keep_safe]
    if not 0 < remove <= len(candidates):
        raise ConfigError(f"Cannot remove {remove} of {len(candidates)} removable blocks.")
    return Plan(num_layers, blocks=tuple(candidates[-remove:]), protected=tuple(keep_safe))


# --- peak memory --------------------------------------------------------------------------------


class PeakMemory:
    """Extra bytes held at peak during a block, on ``device`` (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes: int | None = None

    @contextmanager
    def track(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            yield from self._cuda()
        else:
            yield from self._cpu()

    def _cuda(self) -> Iterator[PeakMemory]:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield self
        torch.cuda.synchronize(self.device)
        self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - before

    def _cpu(self) -> Iterator[PeakMemory]:
        gc.collect()
        _malloc_trim()
        before = _reset_rss_peak()
        yield self
        peak = _proc_status_kb("VmHWM")
        self.peak_bytes = None if before is None or peak is None else max(0, (peak - before) * 1024)


def _malloc_trim() -> None:
    # Not glibc: the peak may read low after earlier runs freed memory into the heap.
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_rss_peak() -> int | None:
    """Reset the kernel's VmHWM to the current RSS; return that RSS (kB), or None if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# --- generation benchmark -----------------------------------------------------------------------


@dataclass
class Candidate:
    """A model to measure, with a display name and its kind (dense / depth / width / ...)."""

    name: str
    model: PreTrainedModel
    kind: str = "dense"
    source: str = ""
    stats: ModelStats | None = None

    def __post_init__(self) -> None:
        self.stats = self.stats or ModelStats.of(self.model)


@dataclass(frozen=True)
class Run:
    seconds: float
    peak_bytes: int | None


def prompt_ids(config: BenchConfig, batch: int, vocab: int) -> torch.Tensor:
    """Seeded random prompt tokens (B, prompt_len), avoiding the first 10 (special) ids."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randint(10, vocab, (batch, config.prompt_len), generator=generator)


@torch.inference_mode()
def generate_once(model: PreTrainedModel, ids: torch.Tensor, new_tokens: int) -> Run:
    """One timed greedy generation of exactly ``new_tokens`` tokens per row."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    memory = PeakMemory(device)
    with memory.track():
        _sync(device)
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            use_cache=True,
            pad_token_id=_pad_id(model),
        )
        _sync(device)
        seconds = time.perf_counter() - start
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"Generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}.")
    return Run(seconds, memory.peak_bytes)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pad_id(model: PreTrainedModel) -> int:
    config = model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, list):
        pad = pad[0]
    return 0 if pad is None else int(pad)


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def benchmark(
    candidates: list[Candidate], config: BenchConfig | None = None, progress: bool = True
) -> dict[str, Any]:
    """Measure every candidate at every batch size, interleaved; return a JSON-able dict."""
    config = config or BenchConfig()
    if not candidates:
        raise ConfigError("Nothing to benchmark.")
    for cand in candidates:
        warning = check_positions(cand.model.config, config, cand.name)
        if warning:
            log.warning(warning)
    runs: dict[tuple[str, int], list[Run]] = {}
    failed: dict[str, int] = {}  # name -> smallest batch size that ran out of memory
    total = len(config.batch_sizes) * len(candidates) * (config.repeats + config.warmup)
    bar = tqdm(total=total, desc="bench", disable=not progress)
    for batch in config.batch_sizes:
        for step in range(config.warmup + config.repeats):
            shift = step % len(candidates)  # rotate the order so no model is always first
            for cand in candidates[shift:] + candidates[:shift]:
                bar.update(1)
                if cand.name in failed:
                    continue
                run = _measure(cand, config, batch, failed)
                if run is not None and step >= config.warmup:
                    runs.setdefault((cand.name, batch), []).append(run)
    bar.close()
    return _summary(candidates, config, runs, failed)


def check_positions(
    model_config: PretrainedConfig | dict[str, Any], config: BenchConfig, name: str
) -> str | None:
    """Refuse a prompt plus generated tokens longer than a learned position table (GPT-2
    fails in its embedding); past a rotary model's trained length, the warning to give (the
    speed is measured where the model was never trained)."""
    return check_generation(config.prompt_len, config.new_tokens, model_config, name)


def _measure(
    cand: Candidate, config: BenchConfig, batch: int, failed: dict[str, int]
) -> Run | None:
    ids = prompt_ids(config, batch, cand.model.config.vocab_size)
    try:
        return generate_once(cand.model, ids, config.new_tokens)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not _is_oom(err):
            raise
        log.warning("%s: out of memory at batch %d; larger batches skipped", cand.name, batch)
        failed[cand.name] = batch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None


def _summary(candidates, config: BenchConfig, runs, failed) -> dict[str, Any]:
    device = next(candidates[0].model.parameters()).device
    models = []
    for cand in candidates:
        rows = [
            _row(cand, config, batch, runs.get((cand.name, batch)), failed)
            for batch in config.batch_sizes
        ]
        models.append(
            {
                "name": cand.name,
                "kind": cand.kind,
                "source": cand.source,
                **asdict(cand.stats),
                "dtype": str(next(cand.model.parameters()).dtype).removeprefix("torch."),
                "results": rows,
            }
        )
    _add_speedups(models)
    return {"protocol": {**asdict(config), **_environment(device)}, "models": models}


def _row(cand: Candidate, config: BenchConfig, batch: int, runs: list[Run] | None, failed) -> dict:
    if not runs:
        oom = cand.name in failed and batch >= failed[cand.name]
        return {"batch_size": batch, "status": "oom" if oom else "missing"}
    latency = statistics.median(r.seconds for r in runs)
    peaks = [r.peak_bytes for r in runs if r.peak_bytes is not None]
    extra_mb = statistics.median(peaks) / MB if peaks else None
    return {
        "batch_size": batch,
        "status": "ok",
        "latency_s": latency,
        "throughput_tok_s": batch * config.new_tokens / latency,
        "latency_runs_s": [r.seconds for r in runs],
        "peak_extra_mb": extra_mb,
        "peak_mb": None if extra_mb is None else cand.stats.weight_mb + extra_mb,
    }


def _add_speedups(models: list[dict[str, Any]]) -> None:
    """Measured speedup (latency ratio) and ideal speedup (MACs ratio) vs the first dense model."""
    base = next((m for m in models if m["kind"] == "dense"), models[0])
    base_latency = {r["batch_size"]: r.get("latency_s") for r in base["results"]}
    for model in models:
        model["ideal_speedup"] = base["macs_per_token"] / model["macs_per_token"]
        model["baseline"] = base["name"]
        for row in model["results"]:
            ref = base_latency.get(row["batch_size"])
            if row.get("latency_s") and ref:
                row["speedup"] = ref / row["latency_s"]


def _environment(device: torch.device) -> dict[str, Any]:
    from secateurs.runinfo import versions

    env = {"device": str(device), "threads": torch.get_num_threads(), "versions": versions()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["peak_memory_method"] = "torch.cuda.max_memory_allocated - allocated before"
    else:
        env["peak_memory_method"] = "VmHWM reset via /proc/self/clear_refs, minus RSS before"
    return env


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: one row per model × batch size."""
    lines = [
        "| model | kind | params (M) | GMACs/token | batch | latency (s) | tokens/s | peak (MB) "
        "| speedup | ideal |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in result["models"]:
        for r in m["results"]:
            lines.append(
                f"| {m['name']} | {m['kind']} | {m['parameters'] / 1e6:.1f} | "
                f"{m['macs_per_token'] / 1e9:.3f} | {r['batch_size']} | "
                f"{_fmt(r.get('latency_s'), 3)} | "
                f"{_fmt(r.get('throughput_tok_s'), 1)} | {_fmt(r.get('peak_mb'), 0)} | "
                f"{_fmt(r.get('speedup'), 2)} | {m['ideal_speedup']:.2f} |"
            )
    return "\n".join(lines)


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# --- building candidates ------------------------------------------------------------------------


# Plan keys that name removed units, per part, in every plan format written so far: the one
# ``plan`` of a run record (``secateurs.plan.Plan.to_dict``) and the width_plan / expert_plan
# of earlier versions' records.
PART_KEYS = {
    "depth": ("blocks", "attn", "mlp"),
    "width": ("heads", "channels"),
    "experts": ("experts", "removed"),
}


def kind_of(record: dict[str, Any]) -> str:
    """ "dense", or the parts a ``secateurs.json`` record removes joined by "+": "depth",
    "width", "experts", "depth+width", ... (read from the keys: any plan format)."""
    plans = [record.get(key) or {} for key in RECORD_KEYS]
    parts = [
        part
        for part, keys in PART_KEYS.items()
        if any(_names_units(plan.get(key)) for plan in plans for key in keys)
    ]
    return "+".join(parts) or "dense"


def _names_units(value: Any) -> bool:
    """True if a per-layer list (or dict) of removals removes anything."""
    if isinstance(value, dict):
        return any(_names_units(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(_names_units(v) if isinstance(v, list | tuple | dict) else True for v in value)
    return False


def load_candidate(spec: str, dtype: str | None = None, device: str = "cpu") -> Candidate:
    """A saved model (directory, alias, hub id) as a candidate; its kind from secateurs.json."""
    from secateurs.checkpoint import read_record
    from secateurs.models import load_model, resolve_model

    location = resolve_model(spec)
    model, _ = load_model(spec, dtype=dtype, device=device)
    name = Path(spec).name if Path(spec).is_dir() else spec
    return Candidate(name, model, kind_of(read_record(location)), source=str(spec))


def random_candidates(
    config_name: str,
    depths: Sequence[int] = (0,),
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> list[Candidate]:
    """Random-weight models of a real shape: dense (depth 0) and with ``depth`` blocks removed."""
    from secateurs.units import apply_plan

    config = random_config(config_name)
    label = Path(config_name).stem
    out = []
    for remove in depths:
        model = random_model(config, dtype, seed)
        if remove:
            apply_plan(model, depth_plan(config.num_hidden_layers, remove))
        name = f"{label} (random)" if not remove else f"{label} -{remove} blocks (random)"
        kind = "depth" if remove else "dense"
        out.append(Candidate(name, model.to(device), kind, f"random:{label}"))
    return out
