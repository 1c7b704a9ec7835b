"""Experts as a unit, for every mixture-of-experts family.

The pruned model must equal the original with the removed experts' router logits at -inf
(exactly: softmax, top-k and renormalisation then see only the kept experts), and save →
reload must give the same logits: plain transformers for one count per layer, secateurs for
per-layer counts.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.allocate import allocate_experts
from secateurs.checkpoint import read_record
from secateurs.cli import main
from secateurs.criteria import CRITERIA
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.run import prune
from secateurs.units import Cut, unit_cost
from secateurs.units.experts import (
    expert_plan,
    experts_masked,
    moe_layers,
    num_experts,
    router_and_experts,
)
from secateurs.writer import save_checkpoint
from tiny_models import MOE_TYPES, scoring_context, tiny_model, tokens

# Llama 4 runs its experts on router-scaled copies of every token: no routing to observe.
ROUTED_TYPES = [t for t in MOE_TYPES if t != "llama4_text"]


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=tokens() if x is None else x).logits


def per_layer_removal(model) -> dict[int, tuple[int, ...]]:
    """Different experts, and different counts, per MoE layer (top-2 of 8 leaves room)."""
    layers = moe_layers(model, adapter_for(model))
    return {layer: tuple(range(k % 8, 8, 3))[: 1 + k % 3] for k, layer in enumerate(layers)}


def uniform_removal(model) -> dict[int, tuple[int, ...]]:
    layers = moe_layers(model, adapter_for(model))
    return {layer: ((layer + 1) % 8, (layer + 3) % 8, (layer + 5) % 8) for layer in layers}


@pytest.fixture(scope="module", params=MOE_TYPES)
def original(request):
    return tiny_model(request.param)


def apply_expert_plan(model, plan) -> bool:
    """Cut ``plan`` out of ``model``; True if its config alone describes the result."""
    cut = Cut(model, plan)
    for layer in range(plan.num_layers):
        cut.layer(layer)
    return cut.finish()


@pytest.mark.parametrize("removal", [per_layer_removal, uniform_removal])
def test_pruned_equals_router_masked(original, removal):
    plan = expert_plan(original, removal(original))
    adapter = adapter_for(original)
    with experts_masked(original, adapter, plan.removed_by_layer()):
        expected = logits(original)
    pruned = copy.deepcopy(original)
    apply_expert_plan(pruned, plan)
    torch.testing.assert_close(logits(pruned), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(logits(original), expected, atol=1e-3)  # the experts mattered
    kept = plan.kept("experts")
    assert [num_experts(pruned, adapter, i) for i in plan.expert_layers] == [
        kept[i] for i in plan.expert_layers
    ]


def test_uniform_counts_reload_with_plain_transformers(original, tmp_path):
    pruned = copy.deepcopy(original)
    plan = expert_plan(pruned, uniform_removal(pruned))
    assert apply_expert_plan(pruned, plan) is True
    key = adapter_for(pruned).experts.count_key
    assert getattr(pruned.config, key) == 5
    save_checkpoint(pruned, None, tmp_path / "m", {"plan": plan.to_dict()})
    record = read_record(tmp_path / "m")
    assert record["loading"]["plain_transformers"] is True
    assert "experts" not in record["structure"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    torch.testing.assert_close(logits(reloaded.eval()), logits(pruned), rtol=0, atol=1e-6)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in pruned.parameters()
    )


def test_per_layer_counts_reload_with_secateurs(original, tmp_path):
    pruned = copy.deepcopy(original)
    plan = expert_plan(pruned, per_layer_removal(pruned))
    assert apply_expert_plan(pruned, plan) is False
    save_checkpoint(pruned, None, tmp_path / "m", {})
    record = read_record(tmp_path / "m")
    assert record["loading"]["plain_transformers"] is False
    assert record["structure"]["experts"] == {
        str(layer): plan.kept("experts")[layer] for layer in plan.expert_layers
    }
    with pytest.raises(Exception, match="secateurs-pruned"):  # a plain load refuses it
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded), logits(pruned), rtol=0, atol=1e-6)


def test_generate_with_cache_matches_without(original):
    pruned = copy.deepcopy(original)
    apply_expert_plan(pruned, expert_plan(pruned, per_layer_removal(pruned)))
    prompt = tokens(batch=1, length=5)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    cached = pruned.generate(prompt, use_cache=True, **kwargs)
    assert torch.equal(cached, pruned.generate(prompt, use_cache=False, **kwargs))


def test_router_and_expert_tensors_are_sliced(original):
    pruned = copy.deepcopy(original)
    adapter = adapter_for(pruned)
    layer = moe_layers(pruned, adapter)[0]
    router0, experts0 = router_and_experts(original, adapter, layer)
    apply_expert_plan(pruned, expert_plan(pruned, {layer: (2, 5)}))
    router, experts = router_and_experts(pruned, adapter, layer)
    keep = [0, 1, 3, 4, 6, 7]
    torch.testing.assert_close(router.weight, router0.weight[keep], rtol=0, atol=0)
    if getattr(router0, "bias", None) is not None:  # GPT-OSS
        torch.testing.assert_close(router.bias, router0.bias[keep], rtol=0, atol=0)
    for name, tensor in experts0.named_parameters():
        torch.testing.assert_close(getattr(experts, name), tensor[keep], rtol=0, atol=0)


def test_a_router_that_cannot_be_masked_fails_loudly():
    model = tiny_model("mixtral")
    router = model.model.layers[0].mlp.gate

    def forward(self, hidden):  # logits from a copy of the weight: invisible to the mask
        hidden = hidden.reshape(-1, 32)
        logits = torch.nn.functional.linear(hidden, self.weight * 1.0)
        top, index = torch.topk(logits.softmax(-1), 2, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    router.forward = forward.__get__(router)
    masking = experts_masked(model, adapter_for(model), {0: (1,)})
    with pytest.raises(UnsupportedModelError, match="cannot be masked"), masking:
        logits(model)


# --- bad input --------------------------------------------------------------------------------
def test_removing_all_experts_or_below_top_k_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="top-2"):
        expert_plan(model, {0: tuple(range(7))})  # 1 left < top-2
    with pytest.raises(ConfigError, match="leaves 0"):
        expert_plan(model, {0: tuple(range(8))})
    with pytest.raises(ConfigError, match="top-k"):
        allocate_experts([torch.rand(8)] * 2, 7, None, floor=2)
    with pytest.raises(ConfigError, match="no routed experts"):
        expert_plan(tiny_model("qwen3_moe"), {0: (1,)})  # layer 0 is dense


def test_bad_expert_options_fail_before_work():
    experts = dict(unit="experts", criterion="magnitude")
    with pytest.raises(ConfigError, match="Say what to remove"):
        prune(tiny_model("mixtral"), **experts)
    with pytest.raises(ConfigError, match="per layer"):
        prune(tiny_model("mixtral"), remove=2, allocation="global", **experts)
    with pytest.raises(ConfigError, match="in \\(0, 1\\)"):
        prune(tiny_model("mixtral"), ratio=1.0, **experts)


def test_dense_model_and_wrong_criterion_are_refused(tokenizer):
    with pytest.raises(UnsupportedModelError, match="no routed experts"):
        prune(
            tiny_model("llama"),
            tokenizer=tokenizer,
            criterion="magnitude",
            unit="experts",
            ratio=0.25,
        )
    with pytest.raises(ConfigError, match="cannot score experts"):
        prune(
            tiny_model("mixtral"), tokenizer=tokenizer, criterion="ppl", unit="experts", ratio=0.25
        )


def test_routing_criteria_refuse_llama4_before_work(tokenizer):
    model = tiny_model("llama4_text")
    with pytest.raises(UnsupportedModelError, match="magnitude"):
        prune(model, tokenizer=tokenizer, criterion="reap", unit="experts", ratio=0.25)
    result = prune(model, tokenizer=tokenizer, criterion="magnitude", unit="experts", remove=2)
    assert result.plan.kept("experts") == (6,) * 6 and model.config.num_local_experts == 6


# --- criteria ---------------------------------------------------------------------------------
def _scores(model, name, calibration):
    ctx = scoring_context(model, calibration, 2)
    return CRITERIA.get(name)().score_experts(ctx), ctx


@pytest.mark.parametrize("model_type", ROUTED_TYPES)
@torch.no_grad()
def test_frequency_counts_top_k_and_ignores_masked_experts(model_type):
    model, calibration = tiny_model(model_type), tokens(batch=4, length=16)
    adapter = adapter_for(model)
    layers = moe_layers(model, adapter)
    scores, _ = _scores(model, "frequency", calibration)
    for values in scores:  # every token picks exactly top-k = 2 distinct experts
        assert float(values.sum()) == pytest.approx(2.0)
        assert values.max() <= 1.0
    with experts_masked(model, adapter, {layers[0]: (3, 4)}):
        masked, ctx = _scores(model, "frequency", calibration)
    assert masked[0][3] == 0 and masked[0][4] == 0 and float(masked[0].sum()) == pytest.approx(2)
    assert ctx.extras["expert_usage"][str(layers[0])] == masked[0].tolist()


@torch.no_grad()
def test_reap_matches_a_direct_computation_on_mixtral():
    model, calibration = tiny_model("mixtral"), tokens(batch=2, length=8)
    scores, _ = _scores(model, "reap", calibration)
    # Recompute layer 0 by hand: gate weights from the router, expert e = down(silu(g) * u).
    captured = {}
    layer0 = model.model.layers[0]
    handle = layer0.mlp.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    model(input_ids=calibration)
    handle.remove()
    x = captured["x"].reshape(-1, 32)
    probs = torch.softmax(x @ layer0.mlp.gate.weight.T, dim=-1)
    top, index = probs.topk(2, dim=-1)
    gates = top / top.sum(-1, keepdim=True)
    experts = layer0.mlp.experts
    for e in range(8):
        tok, slot = torch.where(index == e)
        if len(tok) == 0:
            assert scores[0][e] == 0
            continue
        gate, up = (x[tok] @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[e].T
        expected = (gates[tok, slot] * out.norm(dim=-1)).mean()
        assert float(scores[0][e]) == pytest.approx(float(expected), rel=1e-5)


def test_magnitude_scores_each_experts_own_weights():
    model = tiny_model("gpt_oss")
    scores, _ = _scores(model, "magnitude", None)
    experts = model.model.layers[2].mlp.experts
    expected = sum(p.detach().abs().reshape(8, -1).sum(1) for p in experts.parameters())
    torch.testing.assert_close(scores[2], expected.to(torch.float64))


# --- end to end -------------------------------------------------------------------------------
def test_global_allocation_keeps_top_k_and_hits_the_total():
    scores = [torch.tensor([5.0, 1, 1, 1, 1, 1, 1, 1]), torch.arange(8.0) + 1]
    removed = allocate_experts(scores, None, 8, floor=2)
    assert sum(map(len, removed)) == 8
    assert all(8 - len(r) >= 2 for r in removed)
    assert removed[0] == (1, 2, 3, 4, 5, 6)  # flat, low-scoring layer loses most (capped at 6)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_prune_experts_end_to_end(allocation, tokenizer, tmp_path):
    model = tiny_model("qwen2_moe")
    calibration = tokens(batch=4, length=16)
    reference = copy.deepcopy(model)
    adapter = adapter_for(model)
    expert = unit_cost(model, adapter, moe_layers(model, adapter)[0], "experts")
    amount = dict(remove=2) if allocation == "uniform" else dict(params=12 * expert)
    result = prune(
        model,
        tokenizer=tokenizer,
        criterion="reap",
        unit="experts",
        **amount,
        allocation=allocation,
        calibration=calibration,
        out=tmp_path / "out",
        progress=False,
    )
    plan = result.plan
    assert sum(map(len, plan.experts)) == 12  # a quarter of 6 layers x 8 experts
    record = read_record(tmp_path / "out")
    assert record["plan"] == plan.to_dict() and record["criterion"]["name"] == "reap"
    assert set(record["expert_usage"]) == {str(i) for i in plan.expert_layers}
    with experts_masked(reference, adapter_for(reference), plan.removed_by_layer()):
        expected = logits(reference)
    reloaded, _ = load_model(tmp_path / "out")
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-6)
    # The shared expert is untouched.
    torch.testing.assert_close(
        reloaded.model.layers[0].mlp.shared_expert.up_proj.weight,
        reference.model.layers[0].mlp.shared_expert.up_proj.weight,
    )


def test_cli_prunes_experts(tmp_path, tokenizer, calibration_file, capsys):
    source = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(source)
    tokenizer.save_pretrained(source)
    flags = ["--calibration", str(calibration_file), "--n-samples", "4", "--calib-seq-len", "16"]
    out = tmp_path / "pruned"
    args = ["prune", str(source), "--unit", "experts", "--criterion", "frequency"]
    assert main([*args, "--remove", "2", "--out", str(out), *flags]) == 0
    assert "kept experts per MoE layer" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["num_local_experts"] == 6
    assert AutoModelForCausalLM.from_pretrained(out).model.layers[0].mlp.gate.weight.shape[0] == 6


def test_bench_and_report_on_a_pruned_moe(tmp_path, tokenizer, capsys):
    from secateurs.evaluate.efficiency import linear_macs_per_token

    model = tiny_model("mixtral")
    dense_macs = linear_macs_per_token(model)
    result = prune(
        model,
        tokenizer=tokenizer,
        criterion="frequency",
        unit="experts",
        ratio=0.25,
        allocation="global",
        calibration=tokens(batch=4, length=16),
        out=tmp_path / "pruned",
        progress=False,
    )
    # Each token still runs top-2 experts: only the router's rows of removed experts go.
    removed = sum(map(len, result.plan.experts))
    assert linear_macs_per_token(result.model) == dense_macs - removed * 32
    assert dense_macs > sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    bench = ["bench", str(tmp_path / "pruned"), "--batch-sizes", "1", "--new-tokens", "3"]
    assert (
        main([*bench, "--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")]) == 0
    )
    assert "| pruned | experts |" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "pruned"), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert (
        "Expert usage per MoE layer" in page
        and (tmp_path / "report" / "experts_pruned.png").is_file()
    )


@pytest.mark.parametrize(
    ("model_type", "overrides"),
    [
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1)),
        ("deepseek_v3", dict(n_group=2, topk_group=1)),
        ("glm4_moe", dict(n_group=4, topk_group=2)),
    ],
)
def test_group_limited_routers_are_refused(model_type, overrides, tokenizer):
    from transformers import AutoConfig

    from tiny_models import TINY_CONFIGS

    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="group"):
        prune(model, tokenizer=tokenizer, criterion="magnitude", unit="experts", remove=2)
    layer = moe_layers(model, adapter_for(model))[0]
    with pytest.raises(UnsupportedModelError, match="group"):
        apply_expert_plan(model, expert_plan(model, {layer: (1,)}))


def test_cli_refuses_experts_on_a_dense_model_from_its_config(tmp_path, capsys, monkeypatch):
    source = tmp_path / "dense"
    tiny_model("llama").save_pretrained(source)  # the weight files are checked first

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config refused the run")

    monkeypatch.setattr("secateurs.reload.load_checkpoint", refuse)
    args = ["prune", str(source), "--unit", "experts", "--criterion", "magnitude", "--remove", "1"]
    assert main([*args, "--out", str(tmp_path / "o")]) != 0
    assert "no routed experts" in capsys.readouterr().err


def test_per_layer_experts_with_a_removed_branch_reload_exactly(tmp_path):
    from secateurs.units import apply_plan

    model = tiny_model("qwen2_moe")
    apply_expert_plan(model, expert_plan(model, per_layer_removal(model)))
    apply_plan(model, Plan(6, attn=(2,), mlp=(4,)))
    save_checkpoint(model, None, tmp_path / "m", {})
    structure = read_record(tmp_path / "m")["structure"]
    assert (
        structure["skipped_branches"] == [[2, "attn"], [4, "mlp"]]
        and "4" not in structure["experts"]
    )
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-6)
