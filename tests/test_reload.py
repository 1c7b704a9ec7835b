"""A reloaded pruned model equals the in-memory one: every tiny family, every unit kind, and
config variants whose behaviour depends on a layer's index.

Attention is sharpened (query weights x50) so a wrong per-layer constant (GPT-2's inverse-index
scaling, a sliding-window layer type) moves the logits far above tolerance. Outputs that only
secateurs can rebuild must make a plain ``from_pretrained`` fail loudly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import adapter_for, supported_model_types
from secateurs.checkpoint import read_record
from secateurs.errors import UnsupportedModelError
from secateurs.models import load_model
from secateurs.plan import Plan, Unit
from secateurs.units import apply_plan
from secateurs.units import depth as surgery
from secateurs.units.depth import masked
from secateurs.units.width import width_masked, widths
from secateurs.writer import save_checkpoint
from tiny_models import TINY_CONFIGS, tokens

KINDS = ("block", "attn", "mlp", "heads", "channels")
SHARPEN = 50.0
QUERY_NAMES = ("q_proj", "c_attn", "query_key_value", "qkv_proj", "query")

# Config variants that change per-layer behaviour: (base family, overrides).
VARIANTS = {
    "gpt2-inverse-layer-scaling": ("gpt2", dict(scale_attn_by_inverse_layer_idx=True)),
    "gpt2-inverse-scaling-upcast": (
        "gpt2",
        dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    ),
    "qwen2-sliding-window-layers": (
        "qwen2",
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=3),
    ),
    "mistral-sliding-window": ("mistral", dict(sliding_window=4)),
    "gemma3-irregular-layer-types": (
        "gemma3_text",
        dict(layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"] * 2),
    ),
    "qwen2_moe-sparse-step": (
        "qwen2_moe",
        dict(decoder_sparse_step=2, mlp_only_layers=[0]),
    ),
    "deepseek_v3-dense-prefix": ("deepseek_v3", dict(first_k_dense_replace=2)),
}


def _build(model_type: str, overrides: dict) -> torch.nn.Module:
    if model_type not in TINY_CONFIGS or model_type not in supported_model_types():
        pytest.skip(f"no tiny {model_type} config / adapter")
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
            if any(f".{q}." in f".{name}" for q in QUERY_NAMES):
                param.mul_(SHARPEN)  # sharp attention: per-layer scaling errors become large
    return model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def _depth_plan(model, kind: str) -> Plan:
    layers = {"block": (1, 3), "attn": (1, 4), "mlp": (2, 5)}[kind]
    n = adapter_for(model).num_layers(model)
    return Plan.of_units(n, [Unit(i, kind) for i in layers])


def _width_plan(model, kind: str) -> Plan:
    """Different removals per layer, so the widths are not expressible in a plain config."""
    adapter = adapter_for(model)
    try:
        adapter.width_layout(kind)
    except UnsupportedModelError:
        pytest.skip(f"{adapter.name} has no {kind} width support")
    ws = widths(model, adapter)
    n = len(ws)
    removed = [()] * n
    if kind == "heads":
        removed[1], removed[3] = (0,), (ws[3].kv_heads - 1,)
    else:
        removed[0], removed[2] = tuple(range(0, 16, 2)), tuple(range(5))
    empty = [()] * n
    heads, channels = (removed, empty) if kind == "heads" else (empty, removed)
    return Plan.of_widths(
        n,
        tuple(heads),
        tuple(channels),
        tuple(w.kv_heads for w in ws),
        tuple(w.channels for w in ws),
    )


def _prune(model, kind: str) -> torch.Tensor:
    """Prune ``model`` in place; return the masked original's logits (the reference)."""
    adapter = adapter_for(model)
    if kind in ("block", "attn", "mlp"):
        plan = _depth_plan(model, kind)
        with masked(model, adapter, plan.units):
            expected = _logits(model)
        apply_plan(model, plan, adapter)
        return expected
    plan = _width_plan(model, kind)
    with width_masked(model, adapter, {"heads": plan.heads, "channels": plan.channels}):
        expected = _logits(model)
    apply_plan(model, plan, adapter)
    return expected


def _check_reload(model, expected: torch.Tensor, out) -> None:
    in_memory = _logits(model)
    torch.testing.assert_close(in_memory, expected, atol=1e-5, rtol=1e-5)
    save_checkpoint(model, None, out, {})
    reloaded, _ = load_model(out)
    torch.testing.assert_close(_logits(reloaded), in_memory, atol=1e-5, rtol=1e-5)
    if read_record(out)["loading"]["plain_transformers"]:
        plain = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
        torch.testing.assert_close(_logits(plain), in_memory, atol=1e-5, rtol=1e-5)
    else:  # only secateurs can rebuild it: anything else must refuse, not load it wrong
        with pytest.raises(ValueError, match="secateurs-pruned-"):
            AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_reloaded_equals_in_memory(model_type, kind, tmp_path):
    model = _build(model_type, {})
    _check_reload(model, _prune(model, kind), tmp_path / "out")


@pytest.mark.parametrize("kind", ("block", "attn", "heads"))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reload_with_per_layer_config(variant, kind, tmp_path):
    model_type, overrides = VARIANTS[variant]
    model = _build(model_type, overrides)
    _check_reload(model, _prune(model, kind), tmp_path / "out")


def test_inverse_layer_scaling_error_is_large_without_the_fold(tmp_path, monkeypatch):
    """The fold is what makes GPT-2's reload exact: without it transformers rebuilds each later
    block with its new index's scaling (far above tolerance), and secateurs refuses to save."""
    model = _build("gpt2", dict(scale_attn_by_inverse_layer_idx=True))
    monkeypatch.setattr(surgery, "keep_inverse_layer_scaling", lambda *args: None)
    expected = _prune(model, "block")
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "plain")  # what a naive save would do
    naive = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", attn_implementation="eager")
    error = (_logits(naive.eval()) - expected).abs().max()
    assert error > 1e-2, error  # 1000x the tolerance (1.7e-2 measured)
    with pytest.raises(UnsupportedModelError, match="scaling"):
        save_checkpoint(model, None, tmp_path / "out", {})
    assert not (tmp_path / "out").exists()


def test_sparse_step_becomes_explicit_dense_list():
    """Qwen-MoE's sparse pattern, (index + 1) % step, is rewritten for the kept layers."""
    config = AutoConfig.for_model("qwen2_moe", num_hidden_layers=6)
    config.mlp_only_layers, config.decoder_sparse_step = [0], 2
    # old layers: 0 dense (listed), 1 sparse, 2 dense, 3 sparse, 4 dense, 5 sparse
    adapter_for(config).remap_layer_config(config, kept=[0, 2, 3, 5])
    assert config.mlp_only_layers == [0, 1] and config.decoder_sparse_step == 1


def test_dense_prefix_counts_kept_dense_layers():
    adapter = adapter_for(AutoConfig.for_model("deepseek_v3"))

    class Model:
        config = AutoConfig.for_model("deepseek_v3", num_hidden_layers=6)

    Model.config.first_k_dense_replace = 3
    surgery.update_layer_config(Model, adapter, kept=[0, 2, 4, 5])
    assert Model.config.first_k_dense_replace == 2 and Model.config.num_hidden_layers == 4


def test_heads_then_blocks_with_inverse_layer_scaling(tmp_path):
    """The fold uses each layer's *current* query width, so it holds after head pruning too."""
    model = _build("gpt2", dict(scale_attn_by_inverse_layer_idx=True))
    adapter = adapter_for(model)
    width_plan = _width_plan(model, "heads")  # heads pruned in layers 1 and 3
    depth_plan = Plan.of_units(6, [Unit(0, "block"), Unit(2, "block")])  # 3 becomes 1
    removed_widths = {"heads": width_plan.heads, "channels": width_plan.channels}
    with width_masked(model, adapter, removed_widths), masked(model, adapter, depth_plan.units):
        expected = _logits(model)
    apply_plan(model, width_plan, adapter)
    apply_plan(model, depth_plan, adapter)
    _check_reload(model, expected, tmp_path / "out")


def test_runtime_flags_are_not_mistaken_for_structure(tmp_path):
    """Gradient checkpointing (recovery) changes how layers run, not what a reload builds."""
    model = _build("llama", {})
    model.gradient_checkpointing_enable()
    apply_plan(model, _depth_plan(model, "block"))
    save_checkpoint(model, None, tmp_path / "out", {})
    assert (tmp_path / "out" / "config.json").is_file()
