"""Width pruning through the API: criteria, allocation, FLAP compensation, errors, generate."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.allocate import Bounds, UnitTable, allocate
from secateurs.criteria import CRITERIA
from secateurs.errors import ConfigError, SecateursError, UnsupportedModelError
from secateurs.plan import Plan
from secateurs.run import prune
from secateurs.units import apply_plan
from secateurs.units.width import width_masked, widths
from secateurs.writer import save_checkpoint
from tiny_models import scoring_context, tiny_model, tokens

WIDTH_CRITERIA = [name for name, cls in CRITERIA.items() if "heads" in cls.units]
CALIB = tokens(4, 16, seed=3)


@pytest.mark.parametrize("criterion", WIDTH_CRITERIA)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_every_width_criterion_prunes_to_the_budget(criterion, allocation):
    model = tiny_model("llama")
    result = prune(
        model,
        criterion=criterion,
        unit="width",
        ratio=0.3,
        allocation=allocation,
        calibration=CALIB,
        progress=False,
    )
    params = result.record["parameters"]
    assert abs(params["achieved_ratio"] - 0.3) < 0.05
    assert params["before"] - params["after"] == round(params["achieved_ratio"] * params["base"])
    assert Plan.from_dict(result.plan.to_dict()) == result.plan
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings intact
    assert torch.isfinite(model(input_ids=tokens()).logits).all()


@pytest.mark.parametrize(
    "options",
    [
        {"order": "first"},
        {"order": "second"},
        {"order": "mixed"},
        {"order": "vector", "aggregation": "max"},
        {"aggregation": "mean"},
        {"aggregation": "prod"},
    ],
)
def test_taylor_variants_score_every_group(options):
    model = tiny_model("qwen2")
    ctx = scoring_context(model, CALIB, 2)
    for kind, count in (("heads", 2), ("channels", 64)):
        scores = CRITERIA.get("taylor")(**options).score_width(ctx, kind)
        assert len(scores) == 6 and all(s.shape == (count,) for s in scores)
        assert all(torch.isfinite(s).all() for s in scores)
    assert all(p.grad is None for p in model.parameters())


def test_fluctuation_compensation_equals_mean_filled_masking(tmp_path):
    model = tiny_model("llama")
    adapter = adapter_for(model)
    ctx = scoring_context(model, CALIB, 2)
    scorer = CRITERIA.get("fluctuation")()
    removed = {}
    for kind in ("heads", "channels"):
        scores = scorer.score_width(ctx, kind)
        removed[kind] = [tuple(s.argsort()[: len(s) // 4 or 1].tolist()) for s in scores]
    means = ctx.extras["input_mean"]
    ws = widths(model, adapter)
    plan = Plan.of_widths(
        6,
        tuple(removed["heads"]),
        tuple(removed["channels"]),
        tuple(w.kv_heads for w in ws),
        tuple(w.channels for w in ws),
        compensate=True,
    )
    with torch.no_grad(), width_masked(model, adapter, removed, fill=means):
        expected = model(input_ids=tokens()).logits
    assert apply_plan(model, plan, adapter, means)
    assert model.config.attention_bias and model.config.mlp_bias
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens()).logits, expected, atol=1e-5, rtol=1e-5)
    save_checkpoint(model, None, tmp_path / "m", {})
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=tokens()).logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2"])
def test_generate_with_cache_equals_without(model_type):
    model = tiny_model(model_type)
    prune(
        model,
        criterion="magnitude",
        unit="width",
        ratio=0.3,
        allocation="global",
        progress=False,
    )
    prompt = tokens(1, 5)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, use_cache=True, **kwargs)
    uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_ratio_finer_than_a_kv_group_rounds_instead_of_crashing(caplog):
    model = tiny_model("llama")  # 2 KV groups per layer
    result = prune(model, criterion="magnitude", unit="heads", ratio=0.1, progress=False)
    assert all(k in (1, 2) for k in result.plan.kept("heads"))
    assert model.config.num_attention_heads % model.config.num_key_value_heads == 0


def test_uniform_widths_and_round_to_give_a_plain_config():
    model = tiny_model("llama")
    prune(
        model,
        criterion="magnitude",
        unit="channels",
        ratio=0.3,
        allocation="global",
        uniform_widths=True,
        round_to=8,
        progress=False,
    )
    ws = widths(model, adapter_for(model))
    assert len({w.channels for w in ws}) == 1 and ws[0].channels % 8 == 0
    assert model.config.intermediate_size == ws[0].channels


def test_global_allocation_respects_layer_range_and_bounds():
    scores = tuple(torch.arange(10, dtype=torch.float64) * (i + 1) for i in range(4))
    table = UnitTable("channels", scores, (3,) * 4)
    removed = allocate([table], 12, [1, 2], "global", Bounds(0.1, 0.5))
    assert removed["channels"][0] == () and removed["channels"][3] == ()
    assert sum(len(r) for r in removed["channels"]) == 4
    assert all(1 <= len(removed["channels"][i]) <= 5 for i in (1, 2))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(ratio=1.5), ConfigError, "in (0, 1)"),
        (dict(ratio=0.2, allocation="sideways"), ConfigError, "Unknown allocation"),
        (dict(ratio=0.2, criterion="magnitud"), ConfigError, "Did you mean 'magnitude'"),
        (dict(ratio=0.2, criterion="ppl"), ConfigError, "cannot score heads units"),
        (
            dict(ratio=0.2, criterion="taylor", options={"aggregation": "median"}),
            ConfigError,
            "aggregation",
        ),
        (dict(ratio=0.2, max_ratio=1.0), ConfigError, "keep something"),
        (dict(ratio=0.2, layers="9:3"), ConfigError, "--layers 9:3 selects no layer"),
    ],
)
def test_bad_input_fails_before_any_work(kwargs, error, message):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = dict(criterion="magnitude", unit="width", progress=False)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        prune(model, **{**args, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_adapter_and_compensation_are_clear_errors():
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        prune(tiny_model("bloom"), criterion="magnitude", unit="heads", ratio=0.2)
    with pytest.raises(UnsupportedModelError, match="compensat"):
        prune(
            tiny_model("mistral"),
            criterion="fluctuation",
            unit="width",
            ratio=0.2,
            calibration=CALIB,
            reconstruct=False,
        )


def test_a_plan_that_empties_a_layer_is_rejected():
    with pytest.raises(SecateursError, match="empty the layer"):
        Plan.of_widths(1, ((0, 1),), ((),), (2,), (64,))


def test_compensation_applies_to_any_criterion_and_matches_mean_replacement():
    """--compensate with a criterion that has no means of its own: the pruned model equals the
    original with the removed inputs replaced by their calibration means."""
    from secateurs.criteria.base import input_statistics

    model = tiny_model("llama")
    calib = tokens(batch=4, length=16, seed=5)
    reference = copy.deepcopy(model)
    result = prune(
        model,
        unit="channels",
        criterion="magnitude",
        ratio=0.1,
        compensate=True,
        reconstruct=False,
        progress=False,
        calibration=calib,
    )
    assert result.plan.compensate and result.record["spec"]["compensate"] is True
    ctx = scoring_context(reference, calib, 4)
    means = [s.mean for s in input_statistics(ctx, "channels")]
    x = tokens(seed=9)
    removed = {"channels": result.plan.channels}
    with (
        torch.no_grad(),
        width_masked(reference, adapter_for(reference), removed, {"channels": means}),
    ):
        expected = reference(x).logits
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=1e-5)


def test_sensitivity_allocation_spares_the_sensitive_layer_and_meets_the_target():
    from secateurs.allocate import Bounds, UnitTable, allocate

    scores = tuple(torch.arange(64.0) for _ in range(4))
    tables = [UnitTable("channels", scores, (10,) * 4)]
    target = 4 * 64 * 10 // 4  # a quarter of the channels' parameters
    sensitivity = {"channels": [100.0, 1.0, 1.0, 4.0]}
    removed = allocate(tables, target, range(4), "global", Bounds(), sensitivity=sensitivity)
    counts = [len(r) for r in removed["channels"]]
    assert counts[0] < counts[3] < counts[1] == counts[2]
    assert abs(sum(counts) * 10 - target) <= 10
    assert all(r == tuple(range(n)) for r, n in zip(removed["channels"], counts, strict=True))


def test_global_allocation_learns_to_spare_a_layer_that_matters():
    """Layer 0's MLP made 20x louder: its loss sensitivity is measured and it loses the least."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(20)
    result = prune(
        model,
        criterion="activation",
        unit="channels",
        ratio=0.2,
        allocation="global",
        calibration=tokens(batch=8, length=16, seed=5),
        reconstruct=False,
        progress=False,
    )
    sens = result.record["layer_sensitivity"]["channels"]
    assert sens[0] == max(sens)
    kept = result.plan.kept("channels")
    assert kept[0] == max(kept)
    assert result.record["layer_sensitivity"] is not None


def test_loss_scores_are_ranked_per_parameter_across_layers_and_kinds():
    """Predicted loss changes are spent like a knapsack: cheapest loss per parameter first,
    whatever the layer or kind — not per-layer z-scores, which would cut every layer alike."""
    heads = UnitTable("heads", (torch.tensor([5.0, 9.0]), torch.tensor([50.0, 60.0])), (100, 100))
    channels = UnitTable(
        "channels", (torch.tensor([0.4, 0.3, 2.0]), torch.tensor([0.1, 3.0, 0.2])), (10, 10)
    )
    target = 100 + 3 * 10  # one head group and three channels' worth
    removed = allocate([heads, channels], target, [0, 1], "global", Bounds(), loss_scores=True)
    # per parameter: heads 0.05, 0.09 | 0.5, 0.6; channels 0.04, 0.03, 0.2 | 0.01, 0.3, 0.02
    assert removed["heads"] == [(0,), ()]
    assert removed["channels"] == [(0, 1), (0, 2)]
    standardised = allocate([heads, channels], target, [0, 1], "global", Bounds())
    assert standardised != removed  # the z-scores would take layer 1's head group


def test_influence_global_allocation_needs_no_sensitivity_probe():
    model = tiny_model("llama")
    result = prune(
        model,
        criterion="influence",
        unit="width",
        ratio=0.25,
        allocation="global",
        calibration=tokens(batch=8, length=16, seed=5),
        progress=False,
    )
    record = result.record
    assert record["layer_sensitivity"] is None
    assert "per parameter" in record["allocation_rule"]
    # every removed unit predicts less loss than every kept one of its kind (one cost per kind
    # in this uniform model, so that is the per-parameter order)
    for kind, removed in (("heads", result.plan.heads), ("channels", result.plan.channels)):
        scores = record["width_scores"][kind]
        gone = [s for layer, r in enumerate(removed) for i, s in enumerate(scores[layer]) if i in r]
        kept = [
            s for layer, r in enumerate(removed) for i, s in enumerate(scores[layer]) if i not in r
        ]
        if gone and kept:
            assert max(gone) <= min(kept)
