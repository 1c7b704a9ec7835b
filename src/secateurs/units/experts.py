"""Experts as a unit: remove whole routed experts from mixture-of-experts layers.

An expert is one row of the router (``weight`` and ``bias``) and one slice along dim 0 of every
stacked expert tensor (or one entry of a ``ModuleList``). The reference that surgery must
reproduce is the original model with the removed experts' router logits set to -inf: softmax,
top-k and any top-k renormalisation then see only the kept experts, exactly as the pruned router
does. Shared experts are not routed and are never touched.

    plan = expert_plan(model, {0: (1, 5), 3: (2,)})
    with experts_masked(model, adapter, plan.removed_by_layer()):
        reference = model(ids).logits
    apply_plan(model, plan)  # secateurs.units
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from secateurs.adapters import Adapter, adapter_for
from secateurs.adapters.base import ExpertLayout
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.plan import Plan
from secateurs.units.width import slice_param

if TYPE_CHECKING:  # annotations only: importing transformers costs seconds
    from transformers import PretrainedConfig, PreTrainedModel

log = logging.getLogger(__name__)

COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts")


# --- where experts live -----------------------------------------------------------------------
def expert_layout(adapter: Adapter, config: PretrainedConfig | None = None) -> ExpertLayout:
    """The adapter's expert layout, or a clear error for a dense family (or, with ``config``,
    a variant whose experts cannot be removed)."""
    if adapter.experts is None:
        raise UnsupportedModelError(
            f"Adapter {adapter.name!r} ({', '.join(adapter.model_types)}) has no routed experts; "
            "--unit experts applies to mixture-of-experts models."
        )
    refusal = adapter.experts_refusal(config) if config is not None else ""
    if refusal:
        raise UnsupportedModelError(f"{config.model_type}: experts cannot be removed ({refusal}).")
    return adapter.experts


def _find(block: nn.Module, path: str) -> nn.Module | None:
    try:
        module = block.get_submodule(path)
    except AttributeError:  # a dense layer of an interleaved model, or a removed MLP branch
        return None
    return module


def moe_layers(model: PreTrainedModel, adapter: Adapter) -> list[int]:
    """Indices of the layers that route to experts."""
    layout = expert_layout(adapter)
    layers = adapter.layers(model)
    return [i for i, block in enumerate(layers) if _is_router(_find(block, layout.router))]


def _is_router(module: nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "weight", None), torch.Tensor)


def router_and_experts(
    model: PreTrainedModel, adapter: Adapter, layer: int
) -> tuple[nn.Module, nn.Module]:
    layout = expert_layout(adapter)
    block = adapter.layers(model)[layer]
    return block.get_submodule(layout.router), block.get_submodule(layout.experts)


def num_experts(model: PreTrainedModel, adapter: Adapter, layer: int) -> int:
    router, _ = router_and_experts(model, adapter, layer)
    return int(router.weight.shape[0])


def top_k(model: PreTrainedModel, adapter: Adapter) -> int:
    return int(getattr(model.config, expert_layout(adapter).top_k_key))


def stacked_tensors(experts: nn.Module, count: int) -> list[tuple[str, torch.Tensor]]:
    """The experts module's own parameters and buffers stacked along dim 0 (one per expert)."""
    tensors = [*experts.named_parameters(recurse=False), *experts.named_buffers(recurse=False)]
    return [(name, t) for name, t in tensors if t.ndim >= 1 and t.shape[0] == count]


def expert_weights(model: PreTrainedModel, adapter: Adapter, layer: int) -> list[torch.Tensor]:
    """Every expert tensor of ``layer`` viewed as (experts, -1): row e is expert e's weights."""
    count = num_experts(model, adapter, layer)
    _, experts = router_and_experts(model, adapter, layer)
    if isinstance(experts, nn.ModuleList):
        per_expert = [torch.cat([p.detach().flatten() for p in e.parameters()]) for e in experts]
        return [torch.stack(per_expert)]
    return [t.detach().reshape(count, -1) for _, t in stacked_tensors(experts, count)]


# --- the plan ---------------------------------------------------------------------------------
def expert_plan(model: PreTrainedModel, removed: Mapping[int, Sequence[int]]) -> Plan:
    """A ``Plan`` for ``model`` removing ``removed[layer]`` experts (other MoE layers keep all)."""
    adapter = adapter_for(model)
    layers = moe_layers(model, adapter)
    stray = sorted(set(removed) - set(layers))
    if stray:
        raise ConfigError(f"Layers {stray} have no routed experts (MoE layers: {layers}).")
    n = adapter.num_layers(model)
    return Plan(
        n,
        experts=tuple(tuple(removed.get(i, ())) for i in range(n)),
        num_experts=tuple(num_experts(model, adapter, i) if i in layers else 0 for i in range(n)),
        top_k=top_k(model, adapter),
    )


# --- masking: router logits of removed experts are -inf ---------------------------------------
class _RouterMask(TorchFunctionMode):
    """Adds -inf to the logits of removed experts wherever a masked router weight is used.

    Routers compute their logits with ``F.linear(x, router.weight[, bias])``; intercepting that
    call (by the weight's identity) masks the logits before the family's own softmax / top-k /
    renormalisation, whatever they are.
    """

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks  # id(router weight) -> (experts,) additive mask
        self.hits: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.masks:
            out = out + self.masks[id(args[1])].to(out.device, out.dtype)
            self.hits.add(id(args[1]))
        return out


def _check_masked(mode: _RouterMask, key: int, layer: int):
    """A forward hook on a masked router: fail loudly if its logits were not intercepted (a
    router that casts or copies its weight first would otherwise run unmasked)."""

    def pre(module: nn.Module, args: tuple) -> None:
        mode.hits.discard(key)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        if key not in mode.hits:
            raise UnsupportedModelError(
                f"Layer {layer}: the router did not compute its logits with F.linear on its own "
                "weight, so its experts cannot be masked."
            )

    return pre, post


@contextmanager
def experts_masked(
    model: PreTrainedModel, adapter: Adapter, removed: Mapping[int, Sequence[int]]
) -> Iterator[None]:
    """Run ``model`` as if ``removed[layer]`` experts were gone (never routed to)."""
    masks, routers = {}, []
    for layer, experts in removed.items():
        if not experts:
            continue
        router, _ = router_and_experts(model, adapter, layer)
        mask = torch.zeros(router.weight.shape[0])
        mask[torch.as_tensor(list(experts), dtype=torch.long)] = float("-inf")
        masks[id(router.weight)] = mask
        routers.append((layer, router))
    mode = _RouterMask(masks)
    handles, biases = [], []
    try:
        for layer, router in routers:
            pre, post = _check_masked(mode, id(router.weight), layer)
            handles += [router.register_forward_pre_hook(pre), router.register_forward_hook(post)]
            biases.append(_mask_choice_bias(adapter, router, removed[layer]))
        with mode:
            yield
    finally:
        for handle in handles:
            handle.remove()
        for router, name, original in filter(None, biases):
            setattr(router, name, original)


def _mask_choice_bias(adapter: Adapter, router: nn.Module, experts: Sequence[int]):
    """Set removed experts' selection bias to -inf; returns what to restore (or None)."""
    name = expert_layout(adapter).choice_bias
    if not name:
        return None
    original = getattr(router, name)
    masked = original.clone()
    masked[torch.as_tensor(list(experts), dtype=torch.long)] = float("-inf")
    setattr(router, name, masked)
    return router, name, original


# --- surgery ----------------------------------------------------------------------------------
def prune_layer_experts(
    model: PreTrainedModel, adapter: Adapter, layer: int, removed: Sequence[int]
) -> int:
    """Physically remove ``removed`` experts of ``layer``; returns the experts left."""
    router, experts = router_and_experts(model, adapter, layer)
    count = int(router.weight.shape[0])
    gone = {int(e) for e in removed}
    keep = torch.tensor([e for e in range(count) if e not in gone], dtype=torch.long)
    if len(keep) == 0:
        raise ConfigError(f"Layer {layer}: removing every expert would empty it.")
    for name, tensor in (("weight", router.weight), ("bias", getattr(router, "bias", None))):
        if isinstance(tensor, torch.Tensor) and tensor.shape[0] == count:
            slice_param(router, name, 0, keep)
    _slice_router_buffers(router, count, keep)
    _slice_experts(experts, count, keep)
    for module in (router, experts, _parent(adapter, layer, model)):
        for attr in COUNT_ATTRS:
            if getattr(module, attr, None) == count:
                setattr(module, attr, len(keep))
    if isinstance(router, nn.Linear):
        router.out_features = len(keep)
    return len(keep)


def _slice_router_buffers(router: nn.Module, count: int, keep: torch.Tensor) -> None:
    """Per-expert router buffers (e.g. a score-correction bias) follow their experts."""
    for name, buffer in list(router.named_buffers(recurse=False)):
        if buffer.ndim >= 1 and buffer.shape[0] == count:
            router.register_buffer(name, buffer.index_select(0, keep.to(buffer.device)).clone())


def _slice_experts(experts: nn.Module, count: int, keep: torch.Tensor) -> None:
    if isinstance(experts, nn.ModuleList):
        kept = [experts[int(i)] for i in keep]
        experts._modules.clear()
        for index, module in enumerate(kept):
            experts.add_module(str(index), module)
        return
    stacked = stacked_tensors(experts, count)
    if not stacked:
        raise UnsupportedModelError(
            f"{type(experts).__name__} holds no tensors stacked per expert; cannot slice it."
        )
    for name, tensor in stacked:
        if isinstance(tensor, nn.Parameter):
            slice_param(experts, name, 0, keep)
        else:
            experts.register_buffer(name, tensor.index_select(0, keep.to(tensor.device)).clone())


def _parent(adapter: Adapter, layer: int, model: PreTrainedModel) -> nn.Module:
    path = expert_layout(adapter).router.rpartition(".")[0]
    block = adapter.layers(model)[layer]
    return block.get_submodule(path) if path else block


def check_expert_plan(model: PreTrainedModel, adapter: Adapter, plan: Plan) -> None:
    """The plan's MoE layers and expert counts are the model's (before any cut)."""
    expert_layout(adapter, model.config)
    current = tuple(layer_counts(model, adapter).items())
    expected = tuple((i, plan.num_experts[i]) for i in plan.expert_layers)
    if current != expected:
        raise ConfigError(f"Expert plan expects (layer, count) {expected}, model has {current}.")


def expert_cost(model: PreTrainedModel, adapter: Adapter, layer: int) -> int:
    """Parameters one routed expert of ``layer`` holds (its router row included)."""
    router, found = router_and_experts(model, adapter, layer)
    count = num_experts(model, adapter, layer)
    per_expert = sum(p.numel() for p in found.parameters()) // count
    return per_expert + router.weight.shape[-1]


def layer_counts(model: PreTrainedModel, adapter: Adapter) -> dict[int, int]:
    return {i: num_experts(model, adapter, i) for i in moe_layers(model, adapter)}


def update_expert_config(model: PreTrainedModel, adapter: Adapter) -> bool:
    counts = set(layer_counts(model, adapter).values())
    key = expert_layout(adapter).count_key
    if len(counts) != 1:
        log.info("per-layer expert counts are not expressible in the config: secateurs reloads")
        return False
    (count,) = counts
    old = getattr(model.config, key)
    if count != old:
        setattr(model.config, key, count)
        log.info("config.%s: %d -> %d", key, old, count)
    return True


# --- saving and loading per-layer counts --------------------------------------------------------
def expert_structure(model: PreTrainedModel) -> dict[str, int] | None:
    """Per-layer expert counts ({layer: count}) when the config cannot describe them."""
    adapter = adapter_for(model)
    if adapter.experts is None:
        return None
    counts = layer_counts(model, adapter)
    configured = int(getattr(model.config, adapter.experts.count_key))
    if all(n == configured for n in counts.values()):
        return None
    return {str(layer): n for layer, n in counts.items()}


# --- observing the routing (for data-driven criteria) -------------------------------------------
@dataclass
class Routing:
    """One MoE layer's routing of a batch: inputs x (tokens, hidden), top-k expert ids and
    gate weights (tokens, k), and ``expert_output(e, x)``: expert e's own output on x."""

    layer: int
    hidden: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    experts: nn.Module

    def expert_output(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s output on tokens ``x``, run by the family's own experts code
        (route every token to that one expert with gate weight 1)."""
        index = torch.full((x.shape[0], 1), expert, dtype=self.indices.dtype, device=x.device)
        ones = torch.ones((x.shape[0], 1), dtype=self.weights.dtype, device=x.device)
        return self.experts.forward(x, index, ones)


def _routing_args(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = [*args, *kwargs.values()]
    if len(values) < 3 or not all(isinstance(v, torch.Tensor) for v in values[:3]):
        raise UnsupportedModelError(
            "This experts module is not called as experts(hidden, top_k_index, top_k_weights); "
            "routing-based criteria cannot observe it (use magnitude)."
        )
    return values[0], values[1], values[2]


@contextmanager
def observe_routing(
    model: PreTrainedModel, adapter: Adapter, fn: Any, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Call ``fn(Routing)`` each time an MoE layer routes tokens to its experts."""
    handles = []
    try:
        for layer in moe_layers(model, adapter) if layers is None else layers:
            _, experts = router_and_experts(model, adapter, layer)

            def hook(module: nn.Module, args: tuple, kwargs: dict, layer: int = layer) -> None:
                hidden, indices, weights = _routing_args(args, kwargs)
                fn(Routing(layer, hidden.detach(), indices, weights.detach(), module))

            handles.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --- cost -------------------------------------------------------------------------------------
def routed_expert_macs(model: nn.Module) -> int:
    """Weight MACs per token of stacked routed experts (top-k of them) and non-Linear routers.

    Removing experts leaves this unchanged (each token still runs top-k experts); it shrinks
    the weights to store and load. Zero for dense models and ``ModuleList`` experts (whose
    ``nn.Linear`` modules are counted with the others).
    """
    try:
        adapter = adapter_for(model)
    except UnsupportedModelError:
        return 0
    if adapter.experts is None:
        return 0
    k, total = top_k(model, adapter), 0
    for layer in moe_layers(model, adapter):
        router, experts = router_and_experts(model, adapter, layer)
        count = int(router.weight.shape[0])
        if not isinstance(router, nn.Linear):
            total += router.weight.numel()
        matrices = [t for _, t in stacked_tensors(experts, count) if t.ndim >= 3]
        total += k * sum(t[0].numel() for t in matrices)
    return total
