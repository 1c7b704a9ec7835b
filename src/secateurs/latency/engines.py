"""Engines that serve a model of a given per-layer shape and time it.

An engine turns (shape, per-layer variants, weight type) into something it can run (for
llama.cpp: a GGUF file written by secateurs' own exporter, with random weights, since speed does
not depend on their values) and measures decode and prompt time per token. A second engine
(torch on a GPU) is one more subclass of ``Engine``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import subprocess
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from secateurs.errors import ConfigError, SecateursError, UnsupportedModelError
from secateurs.latency.table import LayerVariant, ModelShape
from secateurs.registry import Registry
from secateurs.targets import LATENCY_ENGINES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchSettings:
    """How to time: threads, prompt and generation lengths, the clock and the statistic (part
    of a table's key), and how many samples (``rounds`` passes over all models, each in a fresh
    order, ``repetitions`` samples per model per pass).

    ``statistic`` "min" (default): the least disturbed sample. Other people's work on a shared
    machine only ever adds time, through the shared caches and memory bandwidth even to CPU
    time; the fastest sample is the best estimate of the quiet machine's speed (as ``timeit``
    advises). "median" is llama-bench's kind of figure, for a quiet machine."""

    threads: int = 1
    n_prompt: int = 512
    n_gen: int = 128
    repetitions: int = 2
    rounds: int = 3
    seed: int = 0
    clock: str = "cpu"  # "cpu": process CPU time (robust on a shared machine); "wall"
    statistic: str = "min"

    def __post_init__(self) -> None:
        if min(self.threads, self.n_prompt, self.n_gen, self.repetitions, self.rounds) < 1:
            raise ConfigError(f"Benchmark settings must all be positive: {self}.")
        if self.clock not in CLOCKS:
            raise ConfigError(f"Unknown clock {self.clock!r}; known: {', '.join(CLOCKS)}.")
        if self.statistic not in STATISTICS:
            known = ", ".join(STATISTICS)
            raise ConfigError(f"Unknown statistic {self.statistic!r}; known: {known}.")


CLOCKS = ("cpu", "wall")
STATISTICS = {"min": min, "median": median}


@dataclass(frozen=True)
class Speed:
    """Seconds per token (the settings' statistic over the samples): ``decode`` (one token at a
    time, batch 1) and ``prompt`` (a prompt of ``n_prompt`` tokens in one batch); ``spread``:
    (max - min) / median per metric; ``cpu_share``: the lowest CPU time / (wall time × threads)
    of a sample (well below 1: the process waited for a core, so its wall time includes other
    people's work); ``values``: every sample, seconds per token on the settings' clock."""

    decode: float
    prompt: float
    spread: dict[str, float]
    samples: int
    cpu_share: float = 1.0
    wall: dict[str, float] | None = None  # the statistic of wall seconds per token
    values: dict[str, list[float]] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "decode_s": self.decode,
            "prompt_s": self.prompt,
            "decode_tps": 1.0 / self.decode,
            "prompt_tps": 1.0 / self.prompt,
            "decode_spread": self.spread["decode"],
            "prompt_spread": self.spread["prompt"],
            "samples": self.samples,
            "cpu_share": self.cpu_share,
            **{f"{m}_wall_tps": 1.0 / s for m, s in (self.wall or {}).items()},
            **{f"{m}_samples_s": v for m, v in (self.values or {}).items()},
        }


class Engine(ABC):
    """Build a model of a given shape for an engine, and time it there."""

    name: str
    dtypes: tuple[str, ...]

    @abstractmethod
    def version(self) -> str:
        """What names the engine's build (part of a table's key)."""

    def machine(self) -> str:
        """What names the hardware it runs on (part of a table's key)."""
        return cpu_id()

    @abstractmethod
    def write_model(
        self, shape: ModelShape, layers: Sequence[LayerVariant], dtype: str, out: Path
    ) -> Path:
        """A servable model with these per-layer forms, under ``out`` (a file or folder)."""

    @abstractmethod
    def measure(self, models: Sequence[Path], settings: BenchSettings) -> list[Speed]:
        """The speed of each model, measured together so they share the machine's state."""

    def check_layers(self, shape: ModelShape, layers: Sequence[LayerVariant]) -> None:
        """Raise if the engine cannot serve a model with these per-layer forms (a search
        should call it on its candidates); every form is servable unless an engine says not."""
        return None

    def check_config(self, config: dict[str, Any]) -> None:
        """Raise if the engine cannot serve a model of this ``config.json`` (any kind of block
        it does not compute); every model is servable unless an engine says not."""
        return None

    def check_model(self, config: Any) -> None:
        """Refuse, from ``config.json`` alone, a model whose latency this engine cannot
        predict: one it cannot serve, or one whose shape the table cannot describe."""
        data = dict(config if isinstance(config, Mapping) else config.to_dict())
        try:
            self.check_config(data)
            ModelShape.from_config(data)
        except (SecateursError, KeyError, TypeError, ValueError) as err:
            detail = f"no {err}" if isinstance(err, KeyError) else str(err)
            raise UnsupportedModelError(
                f"--latency times the model on {self.name}, which cannot take this one: {detail}"
            ) from None

    def check_dtype(self, dtype: str) -> None:
        if dtype not in self.dtypes:
            raise ConfigError(
                f"{self.name} latency tables support weight types {', '.join(self.dtypes)}; "
                f"got {dtype!r}."
            )


def cpu_id() -> str:
    """CPU model, family/model numbers, logical CPUs and the SIMD features the kernels use."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    simd = [
        f
        for f in ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile")
        if f in flags
    ]
    name = info.get("model name") or platform.processor() or platform.machine()
    numbers = f"family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    return f"{name} ({numbers}), {os.cpu_count()} CPUs, {' '.join(simd) or platform.machine()}"


# --- llama.cpp ---------------------------------------------------------------------------------
class _Weights:
    """What the GGUF writer reads from a model: its state dict (random values of the real
    shapes; the exporter names, permutes and converts them as for a pruned checkpoint)."""

    def __init__(self, state: dict) -> None:
        self._state = state

    def state_dict(self) -> dict:
        return self._state


def random_state(shape: ModelShape, layers: Sequence[LayerVariant], seed: int = 0) -> dict:
    """A Hugging Face LLaMA state dict with these per-layer forms (removed blocks left out,
    removed branches without their weights or norm, as secateurs' surgery leaves them)."""
    import torch

    h, d, vocab = shape.hidden_size, shape.head_dim, shape.vocab_size
    largest = max(vocab * h, h * shape.num_heads * d, h * shape.intermediate_size)
    # one random pool, each tensor a view of its start: values are irrelevant to speed, and
    # drawing 135M numbers per probe model would cost more than timing it
    pool = torch.randn(largest, generator=torch.Generator().manual_seed(seed)) * 0.02

    def rand(*size: int) -> torch.Tensor:
        return pool[: math.prod(size)].view(size)

    state = {"model.embed_tokens.weight": rand(vocab, h), "model.norm.weight": torch.ones(h)}
    if not shape.tie_word_embeddings:
        state["lm_head.weight"] = rand(vocab, h)
    for i, v in enumerate(v for v in layers if not v.removed):
        p = f"model.layers.{i}."
        if v.kv_groups:
            q, kv = v.kv_groups * shape.heads_per_group * d, v.kv_groups * d
            state[p + "input_layernorm.weight"] = torch.ones(h)
            for name, size in (("q_proj", (q, h)), ("k_proj", (kv, h)), ("v_proj", (kv, h))):
                state[p + f"self_attn.{name}.weight"] = rand(*size)
            state[p + "self_attn.o_proj.weight"] = rand(h, q)
        if v.channels:
            c = v.channels
            state[p + "post_attention_layernorm.weight"] = torch.ones(h)
            state[p + "mlp.gate_proj.weight"] = rand(c, h)
            state[p + "mlp.up_proj.weight"] = rand(c, h)
            state[p + "mlp.down_proj.weight"] = rand(h, c)
    return state


def shape_config(shape: ModelShape, num_layers: int) -> dict[str, Any]:
    """The LLaMA config fields the GGUF writer reads."""
    return {
        "model_type": "llama",
        "_name_or_path": "latency-probe",
        "num_hidden_layers": num_layers,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate_size,
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
    }


def probe_tokenizer():
    """A byte-level BPE tokenizer of a few tokens: GGUF embeds one, speed never reads it (the
    exporter pads the vocabulary to the model's size with unused entries)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    merge = (alphabet[0], alphabet[1])  # llama.cpp insists on a merges list
    vocab["".join(merge)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[merge], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def probe_layout(shape: ModelShape, layers: Sequence[LayerVariant]):
    from secateurs.export.layout import LayerShape, Layout

    kept = [v for v in layers if not v.removed]
    shapes = tuple(
        LayerShape(v.kv_groups * shape.heads_per_group, v.kv_groups, v.channels) for v in kept
    )
    return Layout(shape_config(shape, len(kept)), shapes, plain=False)


class LlamaCpp(Engine):
    """llama.cpp on this CPU: GGUF from ``secateurs.export``, timed as llama-bench times it.

    ``dtype`` f16 is what ``secateurs export --to gguf`` writes by default (lossless for the
    pruned model's accuracy); f32 is its other output; q8_0 / q4_0 are llama-quantize's output
    from the f16 file, the types most CPU users serve."""

    name = "llama.cpp"
    dtypes = ("f16", "f32", "q8_0", "q4_0")

    def __init__(self, cache: Path | None = None, jobs: int = 2) -> None:
        from secateurs import llamacpp

        self.cache = llamacpp.cache_dir(cache)
        self.jobs = jobs

    def version(self) -> str:
        from secateurs import llamacpp

        return llamacpp.version(self.cache)

    def bench(self) -> Path:
        from secateurs import llamacpp

        return llamacpp.llama_bench(self.cache, self.jobs)

    def write_model(
        self, shape: ModelShape, layers: Sequence[LayerVariant], dtype: str, out: Path
    ) -> Path:
        from secateurs.export import gguf_file

        self.check_dtype(dtype)
        self.check_layers(shape, layers)
        layout = probe_layout(shape, layers)
        weights = _Weights(random_state(shape, layers))
        plain = dtype if dtype in gguf_file.DTYPES else "f16"
        path = out.with_suffix(f".{plain}.gguf")
        _atomic(path, lambda tmp: gguf_file.write(weights, probe_tokenizer(), layout, tmp, plain))
        if plain == dtype:
            return path
        quantized = out.with_suffix(f".{dtype}.gguf")
        _atomic(quantized, lambda tmp: self._quantize(path, tmp, dtype))
        path.unlink()
        return quantized

    def check_layers(self, shape: ModelShape, layers: Sequence[LayerVariant]) -> None:
        """What the GGUF export refuses: the first kept layer must keep its attention
        (llama.cpp reads the head size from layer 0)."""
        from secateurs.export import gguf_file

        gguf_file.check(probe_layout(shape, layers))

    def check_config(self, config: dict[str, Any]) -> None:
        """What ``secateurs export --to gguf`` refuses from the config alone: blocks other than
        LLaMA's, an unsupported rotary scaling, an activation other than SiLU."""
        from secateurs.export.layout import Layout, check_family

        check_family(Layout(config, ()), "gguf")
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"--to gguf: llama.cpp's LLaMA graphs use SiLU; this model uses "
                f"{config.get('hidden_act')!r}."
            )

    def _quantize(self, source: Path, out: Path, dtype: str) -> None:
        from secateurs import llamacpp

        tool = llamacpp.build(self.cache, ("llama-quantize",), self.jobs) / "llama-quantize"
        _run([str(tool), str(source), str(out), dtype.upper()])

    def measure(self, models: Sequence[Path], settings: BenchSettings) -> list[Speed]:
        """Timed by ``llama_speed`` (llama-bench's tests, with CPU time as well as wall time)."""
        return _measure(models, settings, self._speed_samples)

    def measure_llama_bench(self, models: Sequence[Path], settings: BenchSettings) -> list[Speed]:
        """Timed by llama-bench itself (wall clock only): the figure users reproduce."""
        if settings.clock != "wall":
            raise ConfigError("llama-bench reports wall time only: use clock='wall'.")
        return _measure(models, settings, self._bench_samples)

    def _speed_samples(self, models: Sequence[str], settings: BenchSettings) -> list[Sample]:
        from secateurs import llamacpp

        tool = llamacpp.compile_tool(self.cache, SPEED_TOOL, self.jobs)
        command = [str(tool), str(settings.threads), str(settings.n_prompt), str(settings.n_gen)]
        out = _run([*command, str(settings.repetitions), *models])
        samples = []
        for line in out.splitlines():
            model, test, tokens, wall, cpu = line.split("\t")
            cpu_s = int(cpu) / 1e9 / settings.threads
            samples.append(Sample(model, TESTS[test], int(tokens), int(wall) / 1e9, cpu_s))
        return samples

    def _bench_samples(self, models: Sequence[str], settings: BenchSettings) -> list[Sample]:
        command = [str(self.bench()), "-o", "json", "-t", str(settings.threads)]
        command += ["-p", str(settings.n_prompt), "-n", str(settings.n_gen)]
        command += ["-r", str(settings.repetitions)]
        for model in models:
            command += ["-m", model]
        samples = []
        for record in json.loads(_run(command)):
            # llama-bench runs the prompt and the generation tests separately
            metric = "decode" if record["n_gen"] > 0 else "prompt"
            tokens = int(record["n_gen"] or record["n_prompt"])
            for ns in record["samples_ns"]:
                samples.append(Sample(record["model_filename"], metric, tokens, ns / 1e9, None))
        return samples


SPEED_TOOL = Path(__file__).with_name("llama_speed.cpp")
TESTS = {"pp": "prompt", "tg": "decode"}


@dataclass(frozen=True)
class Sample:
    """One timed test: ``tokens`` prompt or generated tokens in ``wall`` seconds (``cpu``: the
    process's CPU seconds per thread, where the timer reports them)."""

    model: str
    metric: str
    tokens: int
    wall: float
    cpu: float | None


def _measure(models: Sequence[Path], settings: BenchSettings, run) -> list[Speed]:
    """``rounds`` passes over all models, each in a fresh order, so that a slow spell of the
    machine hits a different model each time; the median per model and metric."""
    order = [str(m) for m in models]
    shuffle = random.Random(settings.seed)
    samples: list[Sample] = []
    for i in range(settings.rounds):
        shuffle.shuffle(order)
        log.info("timing %d models, pass %d of %d", len(order), i + 1, settings.rounds)
        samples += run(order, settings)
    return [_speed([x for x in samples if x.model == str(m)], settings) for m in models]


def _speed(samples: list[Sample], settings: BenchSettings) -> Speed:
    per_token: dict[str, list[float]] = {"decode": [], "prompt": []}
    wall: dict[str, list[float]] = {"decode": [], "prompt": []}
    for x in samples:
        per_token[x.metric].append((x.cpu if settings.clock == "cpu" else x.wall) / x.tokens)
        wall[x.metric].append(x.wall / x.tokens)
    statistic = STATISTICS[settings.statistic]
    value = {m: statistic(v) for m, v in per_token.items()}
    spread = {m: (max(v) - min(v)) / median(v) for m, v in per_token.items()}
    shares = [x.cpu / x.wall for x in samples if x.cpu is not None]
    share = min(shares) if shares else float("nan")
    walls = {m: statistic(v) for m, v in wall.items()}
    count = len(per_token["decode"])
    return Speed(value["decode"], value["prompt"], spread, count, share, walls, per_token)


def _run(command: list[str]) -> str:
    """Run ``nice``'d (the machine is shared); a failure shows the tool's own message."""
    run = subprocess.run(["nice", "-n", "10", *command], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(
            f"{Path(command[0]).name} failed ({run.returncode}): {run.stderr.strip()[-2000:]}"
        )
    return run.stdout


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(name))
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise


# declared in secateurs.targets (names checked without importing this module), registered here
ENGINES: Registry[type[Engine]] = LATENCY_ENGINES
ENGINES.add(LlamaCpp.name, LlamaCpp, aliases=("llamacpp", "llama-cpp"))
