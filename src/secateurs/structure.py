"""What a pruned model's config cannot say, and whether a reload would build it exactly.

``structure_record`` describes a pruned model for ``secateurs.json``: the branches it removed
(``skipped_branches``), its per-layer widths and expert counts where they differ from what its
config builds, how it loads (``loading``) and which engines load each output kind
(``engines``). Before anything is written the model is compared with one built from its own
config on the meta device: any difference a reload would not repair (a layer-index dependent
constant, a sparse/dense MLP pattern) is refused instead of being saved silently wrong.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from secateurs.checkpoint import MARK_PREFIX
from secateurs.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Module attributes that describe how a model runs now, not what a reload builds.
RUNTIME_ATTRS = frozenset({"training", "gradient_checkpointing"})


def structure_record(model: PreTrainedModel) -> dict[str, Any]:
    """``structure``, ``loading`` and ``engines`` of a pruned model's record (works on a
    ``meta`` model: only shapes and config are read). Refuses what a reload would misread."""
    from secateurs.units.depth import skipped_branches
    from secateurs.units.experts import expert_structure

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
    from secateurs.units.width import widths

    adapter = adapter_for(model)
    if adapter.heads is None and adapter.channels is None:
        return None
    fresh = fresh if fresh is not None else _model_from_own_config(model)
    if fresh is None:
        return None
    if skipped is None:
        from secateurs.units.depth import skipped_branches

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


def engines_for_model(model: PreTrainedModel, plain: bool | None = None) -> dict[str, Any]:
    """Per output kind (``secateurs export --to``): the engines that load a model in memory, or
    why that kind cannot express it; ``plain``: its config alone describes every shape (found
    from the model if not given)."""
    from secateurs.errors import SecateursError
    from secateurs.export import engines_for
    from secateurs.export.layout import LLAMA_FAMILY, Layout, layer_shapes

    try:
        if plain is None:
            plain = _describes_every_shape(model)
        layers = layer_shapes(model) if model.config.model_type in LLAMA_FAMILY else ()
    except SecateursError as err:  # no adapter for this family
        return {"error": str(err)}
    return engines_for(Layout(model.config.to_dict(), layers, plain))


def _describes_every_shape(model: PreTrainedModel) -> bool:
    from secateurs.units.depth import skipped_branches
    from secateurs.units.experts import expert_structure

    structure = (skipped_branches(model), width_structure(model), expert_structure(model))
    return not any(structure)
