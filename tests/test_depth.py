"""Depth surgery invariants, for every adapter × unit kind.

The physically pruned model must equal the original with the same units masked by hooks, and
a saved checkpoint must reload to the same logits (plain transformers for blocks).
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.checkpoint import read_record
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.units import apply_plan
from secateurs.units.depth import masked
from secateurs.writer import save_checkpoint
from tiny_models import LAYERS, TINY_CONFIGS, tiny_model, tokens

MODEL_TYPES = sorted(TINY_CONFIGS)
PLANS = {
    "block": Plan(LAYERS, blocks=(1, 4)),
    "attn": Plan(LAYERS, attn=(0, 3)),  # layer 0: the KV cache's length is read from it
    "mlp": Plan(LAYERS, mlp=(2, 5)),
    "mixed": Plan(LAYERS, blocks=(2,), attn=(0, 4), mlp=(5,)),
}


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.fixture(scope="module", params=MODEL_TYPES)
def original(request):
    return tiny_model(request.param)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_pruned_equals_masked(original, plan_name):
    plan, x = PLANS[plan_name], tokens()
    with masked(original, adapter_for(original), plan.units):
        expected = logits(original, x)
    pruned = apply_plan(copy.deepcopy(original), plan)
    torch.testing.assert_close(logits(pruned, x), expected, rtol=0, atol=1e-5)
    # The masking must matter, or the comparison proves nothing.
    assert not torch.allclose(logits(original, x), expected, atol=1e-3)


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_generate_with_cache_matches_without(original, plan_name):
    pruned = apply_plan(copy.deepcopy(original), PLANS[plan_name])
    prompt = tokens(batch=1, length=5)
    cached = pruned.generate(
        prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True
    )
    fresh = pruned.generate(
        prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=False
    )
    assert cached.shape == (1, 13)
    assert torch.equal(cached, fresh)


def test_block_removal_updates_config_and_layer_indices(original):
    pruned = apply_plan(copy.deepcopy(original), PLANS["block"])
    adapter = adapter_for(pruned)
    assert pruned.config.num_hidden_layers == LAYERS - 2
    assert adapter.num_layers(pruned) == LAYERS - 2
    for index, layer in enumerate(adapter.layers(pruned)):
        indices = {m.layer_idx for m in layer.modules() if hasattr(m, "layer_idx")}
        assert indices <= {index}
    types = getattr(original.config, "layer_types", None)
    if types is not None:
        assert pruned.config.layer_types == [t for i, t in enumerate(types) if i not in (1, 4)]


def test_blocks_reload_with_plain_transformers(original, tmp_path):
    x = tokens()
    pruned = apply_plan(copy.deepcopy(original), PLANS["block"])
    save_checkpoint(pruned, None, tmp_path / "out", {"plan": PLANS["block"].to_dict()})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded, x), logits(pruned, x), rtol=0, atol=1e-6)
    assert read_record(tmp_path / "out")["loading"]["plain_transformers"] is True


@pytest.mark.parametrize("plan_name", ["attn", "mixed"])
def test_branches_reload_exactly_with_secateurs(original, plan_name, tmp_path, tokenizer):
    x = tokens()
    pruned = apply_plan(copy.deepcopy(original), PLANS[plan_name])
    save_checkpoint(pruned, tokenizer, tmp_path / "out", {})
    record = read_record(tmp_path / "out")
    assert record["loading"]["plain_transformers"] is False
    reloaded, _ = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded, x), logits(pruned, x), rtol=0, atol=1e-6)
    # The removed branches' weights are really gone from the checkpoint.
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )


def test_tied_embeddings_stay_tied(tmp_path, tokenizer):
    model = tiny_model("llama")
    assert model.config.tie_word_embeddings
    pruned = apply_plan(model, PLANS["mixed"])
    save_checkpoint(pruned, tokenizer, tmp_path / "out", {})
    reloaded, _ = load_model(tmp_path / "out")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
