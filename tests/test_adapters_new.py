"""The 2026 families: config variants that change a layer's layout, and clear refusals.

The parametrised tests in test_depth / test_width / test_experts run every family's default
tiny config; here each variant that moves norms or changes which branch shares them (Falcon's
three layouts, StableLM's parallel residual, q/k norms) gets the same invariants.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM

from secateurs.adapters import ARCHITECTURES, adapter_for
from secateurs.errors import UnsupportedModelError
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.run import prune
from secateurs.units import apply_plan
from secateurs.units.depth import masked
from secateurs.units.width import width_masked, widths
from secateurs.writer import save_checkpoint
from tiny_models import LAYERS, TINY_CONFIGS, _randomise_norms, tokens

ISSUE_FAMILIES = (
    *("olmo2", "olmo3", "granite", "stablelm", "cohere", "starcoder2", "falcon", "phi", "gptj"),
    *("smollm3", "exaone4", "glm4", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "olmoe"),
)

VARIANTS = {
    "falcon-sequential": ("falcon", dict(parallel_attn=False)),
    "falcon-new-arch": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon-new-arch-1ln": (
        "falcon",
        dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    ),
    "stablelm-sequential": ("stablelm", dict(use_parallel_residual=False, qk_layernorm=True)),
    "cohere-qk-norm": ("cohere", dict(use_qk_norm=True)),
    "phi-qk-layernorm": ("phi", dict(qk_layernorm=True)),
}
MIXED = Plan(LAYERS, blocks=(2,), attn=(0, 4), mlp=(1, 5))


def variant(name: str):
    model_type, overrides = VARIANTS[name]
    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    _randomise_norms(model)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def test_every_issue_family_has_an_adapter():
    for model_type in ISSUE_FAMILIES:
        adapter = adapter_for(AutoConfig.for_model(model_type))
        assert model_type in adapter.model_types
        assert model_type in TINY_CONFIGS  # so the parametrised invariants cover it


def test_every_adapter_declares_real_model_types():
    for _, adapter in ARCHITECTURES.items():
        assert adapter.model_types
        for model_type in adapter.model_types:
            assert model_type in CONFIG_MAPPING, f"{adapter.name}: unknown {model_type!r}"


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_depth_pruned_equals_masked_and_reloads(name, tmp_path):
    model = variant(name)
    with masked(model, adapter_for(model), MIXED.units):
        expected = logits(model)
    assert not torch.allclose(logits(model), expected, atol=1e-3)
    pruned = apply_plan(copy.deepcopy(model), MIXED)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-5)
    save_checkpoint(pruned, None, tmp_path / "m", {})
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["falcon-sequential", "falcon-new-arch"])
def test_falcon_variants_reload_blocks_with_plain_transformers(name, tmp_path):
    pruned = apply_plan(variant(name), Plan(LAYERS, blocks=(1, 4)))
    save_checkpoint(pruned, None, tmp_path / "m", {})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded.eval()), logits(pruned), rtol=0, atol=1e-6)


def test_phi_with_qk_layernorm_prunes_heads_exactly():
    model = variant("phi-qk-layernorm")
    adapter = adapter_for(model)
    from secateurs.plan import Plan

    ws = widths(model, adapter)
    heads = tuple((layer % 2,) for layer in range(LAYERS))
    plan = Plan.of_widths(
        LAYERS, heads, ((),) * LAYERS, tuple(w.kv_heads for w in ws), tuple(w.channels for w in ws)
    )
    with width_masked(model, adapter, {"heads": plan.heads}):
        expected = logits(model)
    apply_plan(model, plan, adapter)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [
        ("cohere-qk-norm", "heads", "use_qk_norm"),
        ("stablelm-sequential", "heads", "qk_layernorm"),
        ("falcon-sequential", "heads", "query_key_value"),
    ],
)
def test_variants_that_cannot_prune_width_are_refused_before_work(name, kind, reason):
    model = variant(name)
    with pytest.raises(UnsupportedModelError, match=reason):
        prune(model, criterion="magnitude", unit=kind, ratio=0.1)


@pytest.mark.parametrize(
    ("model_type", "kind", "reason"),
    [
        ("olmo2", "heads", "q_norm"),
        ("olmo3", "heads", "q_norm"),
        ("gpt_oss", "heads", "sink"),
        ("olmoe", "channels", "mixture of experts"),
        ("mixtral", "channels", "--unit experts"),
        ("qwen2_moe", "channels", "--unit experts"),
    ],
)
def test_families_name_why_a_width_unit_does_not_apply(model_type, kind, reason):
    config = AutoConfig.for_model(model_type, **TINY_CONFIGS[model_type])
    with pytest.raises(UnsupportedModelError, match=reason):
        adapter_for(config).width_layout(kind, config)
