"""Width pruning invariants over every tiny architecture: masked == pruned, reload, generate."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.checkpoint import read_record
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.units import apply_plan
from secateurs.units.width import width_masked, widths
from secateurs.writer import save_checkpoint
from tiny_models import TINY_CONFIGS, tiny_model, tokens


def _has(model_type: str, kind: str) -> bool:
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    return getattr(adapter_for(config), kind) is not None


# BLOOM (ALiBi), OLMo 2/3 (q/k norms over all heads), Falcon: channels only. Mixtures of
# experts have no MLP channels (their unit is a whole expert); OLMoE / GPT-OSS no width at all.
HEAD_TYPES = [t for t in TINY_CONFIGS if _has(t, "heads")]
CHANNEL_TYPES = [t for t in TINY_CONFIGS if _has(t, "channels")]


def _plan(model, heads: list, channels: list) -> Plan:
    ws = widths(model, adapter_for(model))
    n = len(ws)
    heads = heads if heads else [()] * n
    channels = channels if channels else [()] * n
    return Plan.of_widths(
        n,
        tuple(heads),
        tuple(channels),
        tuple(w.kv_heads for w in ws),
        tuple(w.channels for w in ws),
    )


def _logits(model, ids=None):
    with torch.no_grad():
        return model(input_ids=tokens() if ids is None else ids).logits


def _check(model_type: str, heads: list, channels: list, tmp_path, plain: bool) -> None:
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    plan = _plan(model, heads, channels)
    with width_masked(model, adapter, {"heads": plan.heads, "channels": plan.channels}):
        expected = _logits(model)
    apply_plan(model, plan, adapter)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    save_checkpoint(model, None, tmp_path / "m", {})
    record = read_record(tmp_path / "m")
    assert record["loading"]["plain_transformers"] is plain
    if plain:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    else:
        reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(_logits(reloaded.eval()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", HEAD_TYPES)
def test_uniform_heads_and_channels(model_type, tmp_path):
    n = 6
    model = tiny_model(model_type)
    w = widths(model, adapter_for(model))[0]
    heads = [(w.kv_heads - 1,)] * n
    channels = [tuple(range(0, w.channels, 3))] * n if model_type in CHANNEL_TYPES else []
    # OPT / GPT-2 / GPT-NeoX derive head size from hidden / heads: not expressible in a config.
    plain = adapter_for(model).heads.head_dim_key is not None
    _check(model_type, heads, channels, tmp_path, plain=plain)


@pytest.mark.parametrize("model_type", sorted(set(HEAD_TYPES) | set(CHANNEL_TYPES)))
def test_per_layer_widths_reload_with_secateurs(model_type, tmp_path):
    model = tiny_model(model_type)
    w = widths(model, adapter_for(model))[0]
    channels = [tuple(range(layer, w.channels, 2 + layer)) for layer in range(6)]
    channels = channels if model_type in CHANNEL_TYPES else []
    heads = (
        []
        if model_type not in HEAD_TYPES
        else [((layer % w.kv_heads),) if layer % 2 else () for layer in range(6)]
    )
    _check(model_type, heads, channels, tmp_path, plain=False)
