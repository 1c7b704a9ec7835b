"""Expert pruning of a checkpoint read one layer at a time (``prune --sequential --unit experts``).

The same criteria, allocation and surgery as ``experts_api.prune_experts``, with the data flow
of ``SequentialPipeline``: routing criteria (``reap``, ``frequency``) observe each MoE layer's
routing while that layer alone is loaded and runs the cached calibration activations;
``magnitude`` reads each layer's expert weights. Then each layer is loaded again, its experts
cut by ``prune_layer_experts`` and written out in the checkpoint's layout (experts one by one
where the source stores them so, renumbered), as the streamed width surgery does. Memory: one
layer plus the calibration activations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from secateurs.checkpoint import (
    check_output_dir,
)
from secateurs.criteria import ScoringContext
from secateurs.errors import ConfigError
from secateurs.experts import (
    expert_plan,
    moe_layers,
    observe_routing,
    prune_layer_experts,
    top_k,
    update_expert_config,
)
from secateurs.experts_api import (
    ExpertOptions,
    _checked_scorer,
    allocate_experts,
    check_observable,
    experts_record,
)
from secateurs.lazy import LazyModel
from secateurs.pipeline import SequentialPipeline
from secateurs.plan import Plan, check_scores
from secateurs.runinfo import count_parameters
from secateurs.sequential import (
    _Data,
    pipeline_record,
    stream_surgery,
)


def sequential_prune_experts(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    criterion: str = "reap",
    options: ExpertOptions | None = None,
    calibration: Any = None,
    data_root: str | os.PathLike | None = None,
    overwrite: bool = False,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    attn_implementation: str | None = None,
    progress: bool = True,
    **criterion_options: Any,
) -> dict[str, Any]:
    """Score ``source``'s routed experts one layer at a time, remove the lowest, stream the
    result to ``out``. Returns the record saved as ``secateurs.json``."""
    check_output_dir(out, overwrite)
    opts = options or ExpertOptions(ratio=0.25)
    scorer = _checked_scorer(criterion, criterion_options)
    lazy = LazyModel(source, dtype, device, attn_implementation)
    check_observable(lazy.adapter, lazy.config, scorer)
    data = _Data(Path(source), calibration, data_root, batch_size, progress)
    tokens, calib = data.tokens() if scorer.needs_calibration else (None, None)
    model, adapter = lazy.model, lazy.adapter
    before, start = count_parameters(model), time.perf_counter()
    scores, extras = expert_scores(lazy, scorer, tokens, batch_size, progress)
    seconds = time.perf_counter() - start
    for values in scores:
        check_scores(values, scorer.name)
    layers = moe_layers(model, adapter)
    k = top_k(model, adapter)
    removed = allocate_experts(scores, opts, max(k, opts.min_keep, 1))
    plan = expert_plan(model, dict(zip(layers, removed, strict=True)))

    def describe(pruned) -> dict[str, Any]:
        run = (calib, before, seconds, str(source))
        record = experts_record(pruned, plan, scorer, opts, scores, run, extras)
        return record | {"pipeline": pipeline_record(lazy, batch_size), **extras}

    return stream_expert_prune(lazy, plan, out, describe, overwrite, progress)


@torch.no_grad()
def expert_scores(
    lazy: LazyModel, scorer, tokens: torch.Tensor | None, batch_size: int, progress: bool
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Per MoE layer, one score per expert, each layer loaded once; and the criterion's
    extras (the routing criteria's expert usage)."""
    ctx = ScoringContext(lazy.model, lazy.adapter, tokens, batch_size, (), progress)
    wanted = set(moe_layers(lazy.model, lazy.adapter))
    if tokens is None:  # weights only
        if not hasattr(scorer, "layer_experts"):
            raise ConfigError(f"{scorer.name!r} cannot score experts one layer at a time.")
        scores = []
        for index in sorted(wanted):
            with lazy.loaded(index):
                scores.append(scorer.layer_experts(ctx, index))
        return scores, {}
    pipeline = SequentialPipeline(lazy, tokens, batch_size, progress)
    tally, hidden = scorer.tally(lazy.model, lazy.adapter), list(pipeline.calls.hidden)
    for index in pipeline.bar(range(len(lazy.layers)), f"{scorer.name}: layers"):
        observed = [index] if index in wanted else []
        with (
            lazy.loaded(index) as layer,
            observe_routing(lazy.model, lazy.adapter, tally.observe, observed),
        ):
            hidden = pipeline.run(layer, index, hidden)
    return tally.finish(ctx.extras), dict(ctx.extras)


def stream_expert_prune(
    lazy: LazyModel,
    plan: Plan,
    out: str | os.PathLike,
    describe: Callable[[PreTrainedModel], dict[str, Any]],
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Cut ``plan`` out of ``lazy``'s checkpoint layer by layer into ``out``; ``describe`` gives
    the record of the pruned (meta) model. Returns the record saved."""
    model, adapter = lazy.model, lazy.adapter
    removed = plan.removed_by_layer()

    def cut(index: int) -> None:
        if removed.get(index):
            prune_layer_experts(model, adapter, index, removed[index])

    update = lambda: update_expert_config(model, adapter)  # noqa: E731
    return stream_surgery(lazy, out, cut, update, describe, None, overwrite, progress)
