"""The checks a spec gets against a model's config, before any weight is read.

``PruneSpec`` validated its options against each other; here they meet the model: its number
of layers (protected layers, ``--layers``, counts to remove, explicit plans, ``--scores``),
what its architecture's adapter can prune (width kinds, experts, routing observable), all from
``config.json``, so a bad choice costs milliseconds instead of a model load.

``check_source`` is the part that needs neither torch nor transformers (``config.json`` read
as JSON, the weight files' headers): the CLI runs it before importing them, so that these
errors come in about a second, not after the seconds those imports take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from secateurs.adapters import adapter_for
from secateurs.criteria import CRITERIA
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.plan import resolve_protected
from secateurs.spec import DEPTH_KINDS, PruneSpec, scores_file_for
from secateurs.targets import LATENCY_ENGINES

# config.json keys of the number of decoder layers (transformers maps them all to
# num_hidden_layers); a config with none of them is checked once transformers reads it
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def check_config(spec: PruneSpec, config: Any, budget: bool = True) -> None:
    """Refuse what ``config`` alone shows ``spec`` cannot do (``budget``: also whether its
    budget can be met; not when the run only scores)."""
    adapter = adapter_for(config)
    check_layers(spec, int(config.num_hidden_layers), budget)
    if spec.selection.explicit:
        return
    for kind in spec.width_kinds:
        adapter.width_layout(kind, config)  # no width support here → its refusal
    if spec.experts:
        _check_experts(spec, adapter, config)
    if spec.budget.latency is not None:  # the engine, loaded by name, checks what it can time
        LATENCY_ENGINES.get(spec.budget.engine)().check_model(config)


def check_layers(spec: PruneSpec, n: int, budget: bool = True) -> None:
    """Refuse what the number of layers ``n`` alone shows: protected layers, an explicit plan,
    ``--scores``, ``--layers`` or a count of depth units beyond the model."""
    keep = resolve_protected(spec.criterion.protected, n)
    if spec.selection.explicit:
        spec.selection.plan_for(n)  # indices out of range, a plan for another model
        return
    if spec.selection.scores is not None:
        scores_file_for(spec, n)  # missing, not JSON, other keys, another criterion or model
    if spec.width_kinds:
        spec.allocation.layer_range(n)
    counted = budget and spec.budget.remove is not None
    if counted and len(spec.units) == 1 and spec.units[0] in DEPTH_KINDS:
        _check_count(spec.units[0], spec.budget.remove, n, keep)


def check_source(spec: PruneSpec, source: str | os.PathLike, budget: bool = True) -> None:
    """What ``source``'s files show without torch or transformers: an architecture without an
    adapter, damaged or missing files, an unreachable hub id, and (a local directory) what
    ``config.json``'s number of layers refuses."""
    from secateurs.models import check_model_files, check_supported

    check_supported(source)  # an architecture without an adapter, from its config alone
    layers = _layer_count(source)
    if layers is not None:
        check_layers(spec, layers, budget)
    check_model_files(source, shapes=False)  # damaged files named before anything is read


def _layer_count(source: str | os.PathLike) -> int | None:
    """Decoder layers from ``config.json`` or a GGUF's metadata (an alias: its GGUF); None for
    a hub id (checked once its config is read)."""
    from secateurs.models import ALIASES, alias_gguf_path

    text = str(source)
    directory = Path(text).expanduser()
    if text.lower() in ALIASES or directory.suffix == ".gguf":
        path = alias_gguf_path(text.lower()) if text.lower() in ALIASES else directory
        return _gguf_block_count(path) if path.is_file() else None
    if not (directory / "config.json").is_file():
        return None
    from secateurs.checkpoint import unmarked_config_dict

    config = unmarked_config_dict(directory)
    found = [config[k] for k in LAYER_KEYS if isinstance(config.get(k), int) and config[k] > 0]
    return found[0] if found else None


def _gguf_block_count(path: Path) -> int | None:
    """``{architecture}.block_count`` of a GGUF file, from the first values of its header."""
    from secateurs.modelfiles import gguf_header_values

    arch = gguf_header_values(path, {"general.architecture"}).get("general.architecture")
    key = f"{arch}.block_count"
    count = gguf_header_values(path, {key}).get(key) if isinstance(arch, str) else None
    return count if isinstance(count, int) else None


def _check_count(kind: str, count: int, n: int, keep: tuple[int, ...]) -> None:
    removable = n - len(keep)
    if kind == "block":
        removable = min(removable, n - 1)  # one block must remain
    if count > removable:
        raise ConfigError(
            f"Asked to remove {count} {kind} units but only {removable} of {n} are removable "
            f"(protected: {list(keep)}; at least one block must remain)."
        )


def _check_experts(spec: PruneSpec, adapter: Any, config: Any) -> None:
    from secateurs.units.experts import expert_layout

    layout = expert_layout(adapter, config)  # a dense model → its refusal
    scorer = CRITERIA.get(spec.criterion.name)
    if scorer.needs_calibration and not layout.observable:
        raise UnsupportedModelError(
            f"{config.model_type}: its experts are not called with the routing "
            f"(hidden, top-k ids, weights), so {spec.criterion.name!r} cannot observe them; "
            "use --criterion magnitude."
        )
