"""Atomic saving and exact reloading of (pruned) checkpoints.

A pruned model is saved as a standard HF directory plus ``secateurs.json`` (the run record).
Removed blocks are plain config changes that any engine loads. Removed branches and per-layer
widths are not expressible in HF configs: their ``config.json`` gets a ``model_type`` and
``architectures`` no other loader knows (``secateurs-pruned-llama``), so a plain
``from_pretrained``, vLLM or a llama.cpp converter fails loudly instead of filling the missing
branches with random weights; the original values are kept under ``secateurs_original`` and the
record's ``structure`` lets ``secateurs.load_model`` rebuild the model exactly.

Before writing, the model is compared with one built from its own config (on the meta device):
any difference a reload would not repair (a layer-index dependent constant, a sparse/dense MLP
pattern) is refused instead of being saved silently wrong.

Heavy libraries are imported inside functions: the CLI imports this module to print ``--help``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.errors import ModelFileError, UnsupportedModelError
from secateurs.outputs import atomic_directory, check_disk_space, check_output_dir

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

RECORD_FILE = "secateurs.json"
MARK_KEY = "secateurs_original"  # config.json: the real model_type / architectures
MARK_PREFIX = "secateurs-pruned-"
# Module attributes that describe how a model runs now, not what a reload builds.
RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})

__all__ = [
    "MARK_KEY",
    "RECORD_FILE",
    "atomic_directory",
    "check_disk_space",
    "check_output_dir",
    "load_checkpoint",
    "loading_note",
    "read_config",
    "read_record",
    "save_checkpoint",
    "write_json",
]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def read_record(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


# What ``secateurs.json`` may record that a Hugging Face config cannot describe.
STRUCTURE_KEYS = ("skipped_branches", "widths", "experts")


def recorded_structure(directory: str | os.PathLike) -> list[str]:
    """The structure kinds (``STRUCTURE_KEYS``) present in ``directory``'s record; empty for a
    checkpoint whose config alone describes every shape."""
    structure = read_record(directory).get("structure", {})
    return [key for key in STRUCTURE_KEYS if structure.get(key)]


# --- config.json --------------------------------------------------------------------------------


def read_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a local model directory, as written (a clear error if it is not JSON)."""
    path = Path(directory) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path} is not valid JSON ({err}); the model files are damaged."
        ) from err
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelFileError(f"{path} has no 'model_type': not a Hugging Face model config.")
    return data


def original_model_type(config: dict[str, Any]) -> str:
    """The architecture's model type, also for configs marked by secateurs."""
    return config.get(MARK_KEY, {}).get("model_type") or config["model_type"]


def unmarked_config_dict(directory: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` as the architecture wrote it: secateurs' loud-failing mark undone."""
    data = read_config_dict(directory)
    if MARK_KEY in data:
        original = data.pop(MARK_KEY)
        data.pop("secateurs_load_with", None)
        data["model_type"] = original["model_type"]
        data["architectures"] = original.get("architectures")
    return data


def read_config(directory: str | os.PathLike) -> PretrainedConfig:
    """The config of a local model directory, with secateurs' loud-failing mark undone."""
    from transformers import AutoConfig

    if MARK_KEY not in read_config_dict(directory):
        return AutoConfig.from_pretrained(directory)
    data = unmarked_config_dict(directory)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config._name_or_path = str(directory)
    return config


# Appended to the marked model_type: transformers' refusal quotes the model_type, then advises
# upgrading transformers, so the model_type itself must say what works instead.
MARK_ADVICE = (
    "; no transformers version loads this pruned model: use secateurs.load_model(dir), "
    "or convert it for an engine with 'secateurs export'"
)


def mark_config(directory: Path) -> None:
    """Make ``config.json`` unloadable by anything but secateurs (see module docstring)."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    original = {"model_type": data["model_type"], "architectures": data.get("architectures")}
    data["model_type"] = MARK_PREFIX + original["model_type"] + MARK_ADVICE
    data["architectures"] = [f"SecateursPruned{a}" for a in original["architectures"] or []]
    data[MARK_KEY] = original
    data["secateurs_load_with"] = (
        "secateurs.load_model(dir): removed branches or per-layer widths (see secateurs.json)"
    )
    write_json(path, data)


# --- saving -------------------------------------------------------------------------------------


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    out: str | os.PathLike,
    record: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Save model, tokenizer and run record to ``out`` atomically (one writer at a time)."""
    check_output_dir(out, overwrite)  # before anything is built
    record = {**record, **structure_record(model)}
    note = record["loading"]
    with atomic_directory(out, overwrite=overwrite, needed=checkpoint_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        if not note["plain_transformers"]:
            mark_config(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / RECORD_FILE, record)
    log.info("Saved to %s", out)
    return Path(out)


def structure_record(model: PreTrainedModel) -> dict[str, Any]:
    """``structure``, ``loading`` and ``engines`` of a pruned model's record (works on a
    ``meta`` model: only shapes and config are read). Refuses what a reload would misread."""
    from secateurs.experts import expert_structure
    from secateurs.export import engines_for_model
    from secateurs.surgery import skipped_branches

    skipped = skipped_branches(model)
    fresh = _model_from_own_config(model)
    layer_widths = width_structure(model, fresh, skipped)
    experts = expert_structure(model)
    check_reloadable(model, fresh, skipped, bool(layer_widths) or bool(experts))
    structure: dict[str, Any] = {"skipped_branches": [list(unit) for unit in skipped]}
    if layer_widths:
        structure["widths"] = layer_widths
    if experts:
        structure["experts"] = experts
    note = loading_note(bool(skipped), bool(layer_widths), bool(experts))
    # per output kind (secateurs export --to ...): which engines can load it
    engines = engines_for_model(model, plain=note["plain_transformers"])
    return {"structure": structure, "loading": note, "engines": engines}


def checkpoint_bytes(model: PreTrainedModel) -> int:
    """Bytes the weights take on disk (tied weights once), plus a margin for small files."""
    seen = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    return int(sum(seen.values()) * 1.02) + (20 << 20)


def _model_from_own_config(model: PreTrainedModel) -> PreTrainedModel | None:
    """What a reload builds before loading weights: the model of the saved config, on meta."""
    import torch
    from transformers import AutoModelForCausalLM

    config = type(model.config).from_dict(model.config.to_dict())
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # an exotic config: the reload tests are then the only guard
        log.warning("Could not build %s from its config to check it (%s)", config.model_type, err)
        return None


def width_structure(
    model: PreTrainedModel, fresh: PreTrainedModel | None = None, skipped: list | None = None
) -> dict[str, list[int]] | None:
    """Per-layer widths, if a model built from the config alone would have other shapes in
    the branches it keeps (``skipped``: its removed branches, as ``(layer, kind)``)."""
    from secateurs.adapters import adapter_for
    from secateurs.width import widths

    adapter = adapter_for(model)
    if adapter.heads is None and adapter.channels is None:
        return None
    fresh = fresh if fresh is not None else _model_from_own_config(model)
    if fresh is None:
        return None
    if skipped is None:
        from secateurs.surgery import skipped_branches

        skipped = skipped_branches(model, adapter)
    actual, expected = widths(model, adapter), widths(fresh, adapter)
    # A removed branch reads as width 0; it is recorded under skipped_branches, not a width.
    kept = [
        _as_if_kept(width, default, {kind for layer, kind in skipped if layer == index})
        for index, (width, default) in enumerate(zip(actual, expected, strict=True))
    ]
    if kept == expected:
        return None
    return {
        "heads": [w.heads for w in actual],
        "kv_heads": [w.kv_heads for w in actual],
        "channels": [w.channels for w in actual],
    }


def _as_if_kept(width, default, removed: set[str]):
    """``width`` with the parts of removed branches read as the config's own."""
    if "attn" in removed:
        width = replace(width, heads=default.heads, kv_heads=default.kv_heads)
        width = replace(width, head_dim=default.head_dim)
    if "mlp" in removed:
        width = replace(width, channels=default.channels)
    return width


def check_reloadable(
    model: PreTrainedModel, fresh: PreTrainedModel | None, skipped: list, widths: bool
) -> None:
    """Refuse to save what a reload would rebuild differently (see module docstring)."""
    if fresh is None:
        return
    problems = _parameter_mismatches(model, fresh, skipped, widths) + _constant_mismatches(
        model, fresh
    )
    if problems:
        raise UnsupportedModelError(
            f"This pruned {model.config.model_type} model cannot be saved exactly: a reload "
            f"would build it differently ({'; '.join(problems[:4])}). Nothing was written. "
            "Please report this with the model's config."
        )


def _parameter_mismatches(
    model: PreTrainedModel, fresh: PreTrainedModel, skipped: list, widths: bool
) -> list[str]:
    from secateurs.adapters import adapter_for

    adapter = adapter_for(model)
    ours = {n: p.shape for n, p in model.named_parameters()}
    theirs = {n: p.shape for n, p in fresh.named_parameters()}
    removed = tuple(
        f"{adapter.layers_path}.{layer}.{name}."
        for layer, kind in skipped
        for name in adapter.sub_block(kind, model.config).module_names()
    )
    problems = [f"{n} would be missing" for n in ours if n not in theirs]
    problems += [
        f"{n} would be added" for n in theirs if n not in ours and not n.startswith(removed)
    ]
    if not widths:
        problems += [
            f"{n} would have shape {tuple(theirs[n])}"
            for n in ours
            if n in theirs and theirs[n] != ours[n]
        ]
    return problems


def _constant_mismatches(model: PreTrainedModel, fresh: PreTrainedModel) -> list[str]:
    """Flags, strings and floats of layer modules that a reload would set differently (e.g.
    GPT-2's ``scaling`` from the layer index, a sliding-window layer type)."""
    theirs = dict(fresh.named_modules())
    problems = []
    for name, module in model.named_modules():
        other = theirs.get(name)
        if other is None or type(other) is not type(module):
            continue
        for attr, value in vars(module).items():
            if attr.startswith("_") or attr in RUNTIME_ATTRS or not hasattr(other, attr):
                continue
            if not _same_constant(value, getattr(other, attr)):
                problems.append(f"{name}.{attr} = {value!r}, reloaded {getattr(other, attr)!r}")
    return problems


def _same_constant(ours: Any, theirs: Any) -> bool:
    """Compare only scalars whose meaning cannot be a width (widths are checked separately)."""
    simple = (bool, str, float, type(None))
    if not isinstance(ours, (*simple, int)) or not isinstance(theirs, (*simple, int)):
        return True
    if type(ours) is int and type(theirs) is int:
        return True
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=1e-6)
    return ours == theirs


def loading_note(
    skipped_branches: bool, widths: bool = False, experts: bool = False
) -> dict[str, Any]:
    """What can load the checkpoint; printed by ``prune`` and kept in ``secateurs.json``."""
    if not skipped_branches and not widths and not experts:
        return {
            "plain_transformers": True,
            "how": "AutoModelForCausalLM.from_pretrained(dir) loads it exactly; other engines too.",
        }
    what = " and ".join(
        part
        for part, present in (
            ("removed attention/MLP branches", skipped_branches),
            ("per-layer widths (attention heads / MLP channels)", widths),
            ("per-layer expert counts (MoE)", experts),
        )
        if present
    )
    return {
        "plain_transformers": False,
        "how": (
            f"It has {what}, which a Hugging Face config cannot express: load it with "
            "secateurs.load_model(dir). Its config.json is marked (model_type "
            f"'{MARK_PREFIX}…') so plain from_pretrained, vLLM and llama.cpp converters refuse "
            "it instead of loading it wrong; export it for those engines."
        ),
    }


# --- loading ------------------------------------------------------------------------------------


def load_checkpoint(
    location: str, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load an HF directory or hub id; rebuild secateurs structure recorded beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    local = Path(location).is_dir()
    if local:
        check_safetensors(Path(location))
    structure = read_record(location).get("structure", {}) if local else {}
    skipped = structure.get("skipped_branches", [])
    kwargs = {"dtype": dtype, "config": read_config(location)} if local else {"dtype": dtype}
    tokenizer = _tokenizer(location)
    if structure.get("experts"):
        from secateurs.experts import load_with_experts

        experts = structure["experts"]
        return load_with_experts(Path(location), experts, dtype, skipped), tokenizer
    if structure.get("widths"):
        return _load_with_widths(Path(location), skipped, structure["widths"], kwargs), tokenizer
    if not skipped:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs), tokenizer
    return _load_with_structure(Path(location), skipped, kwargs), tokenizer


def check_safetensors(directory: Path) -> None:
    """Name a truncated or corrupt ``*.safetensors`` file before transformers trips on it."""
    for path in sorted(directory.glob("*.safetensors")):
        size = path.stat().st_size
        try:
            with path.open("rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if length <= 0 or 8 + length > size:
                    raise ValueError("header cut off")
                header = json.loads(handle.read(length))
            end = max(
                (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ModelFileError(f"{path} is not a valid safetensors file ({err}).") from err
        if 8 + length + end > size:
            raise ModelFileError(
                f"{path} is truncated: {size:,} bytes, its header needs {8 + length + end:,}. "
                "Copy or download it again."
            )


def _tokenizer(location: str) -> Tokenizer | None:
    """The tokenizer beside a checkpoint; None for a local directory saved without one."""
    from transformers import AutoTokenizer

    path = Path(location)
    if path.is_dir() and not any(path.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(location)


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """Silence transformers' LOAD REPORT of weights we replace anyway; we check the rest."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _load_with_widths(
    directory: Path, skipped: list[list], layer_widths: dict[str, list[int]], kwargs: dict
) -> PreTrainedModel:
    """Load through transformers (key renames, ties), cut every layer to its recorded widths,
    then fill the weights transformers could not place because of their shapes.

    Strict: every mismatched weight must be in the files with the recorded shape.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from secateurs.adapters import adapter_for
    from secateurs.width import layer_width, prune_layer

    with _quiet_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, ignore_mismatched_sizes=True, output_loading_info=True, **kwargs
        )
    adapter = adapter_for(model)
    _check_missing(directory, model, adapter, skipped, info)
    for index, block in enumerate(adapter.layers(model)):
        now = layer_width(adapter, block)
        for kind, have, want in (
            ("heads", now.kv_heads, layer_widths["kv_heads"][index]),
            ("channels", now.channels, layer_widths["channels"][index]),
        ):
            if want < have:
                prune_layer(model, adapter, index, kind, range(want, have))
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in [m[0] if isinstance(m, (tuple, list)) else m for m in info["mismatched_keys"]]:
            if key not in state or key not in params or params[key].shape != state[key].shape:
                raise ModelFileError(
                    f"{directory}: weight {key} does not match the recorded widths."
                )
            params[key].copy_(state[key].to(params[key].dtype))
    return model


def _load_with_structure(directory: Path, skipped: list[list], kwargs: dict) -> PreTrainedModel:
    """Load through transformers (key renames, ties, dtype), then drop the recorded branches.

    The removed branches' weights are absent from the files, so transformers initialises them
    randomly; they are replaced at once, and any *other* missing weight is an error.
    """
    from transformers import AutoModelForCausalLM

    from secateurs.adapters import adapter_for

    with _quiet_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, output_loading_info=True, **kwargs
        )
    _check_missing(directory, model, adapter_for(model), skipped, info)
    return model


def _check_missing(directory: Path, model, adapter, skipped: list[list], info: dict) -> None:
    """Replace the recorded removed branches; any other missing or unexpected weight is an
    error (what transformers' load report would have shown)."""
    from secateurs.surgery import skip_branch
    from secateurs.units import Unit

    expected_missing = set()
    for layer, kind in skipped:
        unit = Unit(int(layer), kind)
        prefix = f"{adapter.layers_path}.{unit.layer}."
        for module, name in zip(
            adapter.unit_modules(model, unit.layer, kind),
            adapter.sub_block(kind, model.config).module_names(),
            strict=True,
        ):
            # state_dict: parameters and persistent buffers (a router's selection bias)
            expected_missing |= {f"{prefix}{name}.{key}" for key in module.state_dict()}
        skip_branch(model, adapter, unit)
    unexplained = sorted(set(info["missing_keys"]) - expected_missing)
    if unexplained or info["unexpected_keys"]:
        raise ModelFileError(
            f"{directory}: checkpoint does not match its recorded structure "
            f"(missing {unexplained[:5]}, unexpected {sorted(info['unexpected_keys'])[:5]})."
        )
