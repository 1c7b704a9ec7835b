"""Exact reloading of pruned checkpoints (``secateurs.load_model`` of a directory).

Removed blocks and uniform widths are plain config changes that ``from_pretrained`` loads.
Removed branches, per-layer widths and per-layer expert counts are recorded under
``structure`` in ``secateurs.json``: the model is loaded through transformers (its key renames,
ties and conversions) and cut to the recorded structure, strictly: any weight missing or
mismatched beyond what the structure explains is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.adapters import adapter_for
from secateurs.checkpoint import read_config, read_record
from secateurs.errors import ModelFileError
from secateurs.plan import Unit
from secateurs.units.depth import skip_branch
from secateurs.units.experts import num_experts, prune_layer_experts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)


def load_checkpoint(
    location: str, dtype: torch.dtype | str | None = None
) -> tuple[PreTrainedModel, Tokenizer]:
    """Load an HF directory or hub id; rebuild secateurs structure recorded beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    local = Path(location).is_dir()
    structure = read_record(location).get("structure", {}) if local else {}
    skipped = structure.get("skipped_branches", [])
    kwargs = {"dtype": dtype, "config": read_config(location)} if local else {"dtype": dtype}
    tokenizer = _tokenizer(location)
    if structure.get("experts"):
        experts = structure["experts"]
        return load_with_experts(Path(location), experts, dtype, skipped), tokenizer
    if structure.get("widths"):
        return _load_with_widths(Path(location), skipped, structure["widths"], kwargs), tokenizer
    if not skipped:
        return AutoModelForCausalLM.from_pretrained(location, **kwargs), tokenizer
    return _load_with_structure(Path(location), skipped, kwargs), tokenizer


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

    from secateurs.units.width import layer_width, prune_layer

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

    with _quiet_load_report():
        model, info = AutoModelForCausalLM.from_pretrained(
            directory, output_loading_info=True, **kwargs
        )
    _check_missing(directory, model, adapter_for(model), skipped, info)
    return model


def _check_missing(directory: Path, model, adapter, skipped: list[list], info: dict) -> None:
    """Replace the recorded removed branches; any other missing or unexpected weight is an
    error (what transformers' load report would have shown)."""

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


def cut_to_counts(model: PreTrainedModel, counts: Mapping[str, int]) -> None:
    """Shrink MoE layers to ``counts`` ({layer: experts}) by dropping their last experts."""
    adapter = adapter_for(model)
    for layer_text, want in counts.items():
        have = num_experts(model, adapter, int(layer_text))
        if want < have:
            prune_layer_experts(model, adapter, int(layer_text), range(want, have))


def load_with_experts(
    directory: Path,
    counts: Mapping[str, int],
    dtype: torch.dtype | str,
    skipped: Sequence[Sequence[Any]] = (),
) -> PreTrainedModel:
    """Load a checkpoint whose MoE layers keep different expert counts, strictly.

    The model class is built with each layer already cut to its recorded count, so transformers'
    own loading (including its conversion of per-expert checkpoint keys to stacked tensors)
    fills every tensor with the right shape; anything missing or mismatched is an error.
    """
    from transformers import AutoModelForCausalLM

    config = read_config(directory)  # undoes the mark that makes plain loaders refuse it
    base = AutoModelForCausalLM._model_mapping[type(config)]
    cut = type(base.__name__, (base,), {"__init__": _cut_init(base, counts, skipped)})
    model, info = cut.from_pretrained(
        directory, config=config, dtype=dtype, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ValueError(f"{directory}: checkpoint does not match its recorded experts: {info}")
    return model


def _cut_init(base: type, counts: Mapping[str, int], skipped: Sequence[Sequence[Any]]):
    def __init__(self, config, *args, **kwargs):  # noqa: N807
        base.__init__(self, config, *args, **kwargs)
        cut_to_counts(self, counts)
        for layer, kind in skipped:  # removed branches: no weights to load
            skip_branch(self, adapter_for(self), Unit(int(layer), kind))

    return __init__
