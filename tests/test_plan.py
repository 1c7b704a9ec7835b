"""One Plan for every unit kind: validation of each part and of their combination, JSON round
trips (and earlier versions' record formats), one surgery entry, save -> reload."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from secateurs.adapters import adapter_for
from secateurs.checkpoint import read_record
from secateurs.choose import decoder_parameters
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.evaluate.efficiency import kind_of
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.report import describe_removed
from secateurs.run import prune
from secateurs.session import ResidentSession
from secateurs.units import Cut, apply_plan
from secateurs.units.depth import masked
from secateurs.units.experts import expert_plan, experts_masked
from secateurs.units.width import width_masked, widths
from secateurs.writer import save_checkpoint
from tiny_models import LAYERS, tiny_model, tokens


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens()).logits


def _combined(model) -> Plan:
    """Blocks 1 and 4 whole, layer 3's MLP branch, head groups and channels elsewhere (different
    per layer, so the widths are not expressible in a plain config)."""
    ws = widths(model, adapter_for(model))
    heads = ((0,), (), (1,), (1,), (), ())  # layer 3 keeps its attention: heads may go
    channels = ((1, 5, 9), (), (0, 2, 4, 6), (), (), tuple(range(8)))
    return Plan(
        LAYERS,
        blocks=(1, 4),
        mlp=(3,),
        heads=heads,
        channels=channels,
        num_heads=tuple(w.kv_heads for w in ws),
        num_channels=tuple(w.channels for w in ws),
    )


def test_combined_plan_round_trips_through_json():
    plan = _combined(tiny_model("llama"))
    assert plan.parts == ("depth", "width")
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert plan.part("depth").merged(plan.part("width")) == plan
    assert plan.without("width") == plan.part("depth") and not plan.part("depth").has_widths
    moe = expert_plan(tiny_model("mixtral"), {0: (1, 5), 3: (2,)})
    both = moe.merged(Plan(LAYERS, blocks=(2,), attn=(0,)))
    assert both.parts == ("depth", "experts")
    assert Plan.from_dict(json.loads(json.dumps(both.to_dict()))) == both


def test_depth_only_and_width_only_plans_write_what_earlier_versions_wrote():
    depth = Plan(8, blocks=(3, 1), attn=(5,), protected=(0,))
    assert depth.to_dict() == {
        "num_layers": 8,
        "blocks": [1, 3],
        "attn": [5],
        "mlp": [],
        "protected": [0],
    }
    width = Plan.of_widths(2, ((0,), ()), ((), (1, 2)), (3, 3), (64, 64), compensate=True)
    assert {k: v for k, v in width.to_dict().items() if k not in Plan(2).to_dict()} == {
        "heads": [[0], []],
        "channels": [[], [1, 2]],
        "num_heads": [3, 3],
        "num_channels": [64, 64],
        "compensate": True,
    }


def test_earlier_record_formats_are_read():
    """Records written before the one Plan: depth under "plan", width under "width_plan",
    experts under "expert_plan" (removals per MoE layer)."""
    width = {
        "num_layers": 2,
        "heads": [[0], []],
        "channels": [[], [1]],
        "num_heads": [3, 3],
        "num_channels": [8, 8],
        "compensate": False,
    }
    assert Plan.of_record({"width_plan": width}) == Plan.of_widths(
        2, ((0,), ()), ((), (1,)), (3, 3), (8, 8)
    )
    depth = {"num_layers": 4, "blocks": [2], "attn": [], "mlp": [1], "protected": [0]}
    assert Plan.of_record({"plan": depth}) == Plan(4, blocks=(2,), mlp=(1,), protected=(0,))
    experts = {"num_layers": 3, "layers": [0, 2], "num_experts": [8, 8], "removed": [[1], []]}
    plan = Plan.of_record({"expert_plan": {**experts, "top_k": 2}})
    assert plan.experts == ((1,), (), ()) and plan.num_experts == (8, 0, 8)
    assert plan.expert_layers == (0, 2) and plan.top_k == 2
    assert Plan.of_record({"parameters": {}}) is None
    assert kind_of({"width_plan": width}) == "width"
    assert kind_of({"plan": depth, "width_plan": width}) == "depth+width"


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(blocks=(0,), heads=((1,), ()), num_heads=(3, 3)), r"removed whole and also lose"),
        (dict(attn=(1,), heads=((), (1,)), num_heads=(3, 3)), r"without attention .* heads"),
        (dict(mlp=(0,), channels=((1,), ()), num_channels=(8, 8)), r"without MLP .* channels"),
        (dict(mlp=(1,), experts=((), (1,)), num_experts=(4, 4), top_k=1), r"without MLP"),
        (dict(heads=((0, 1, 2), ()), num_heads=(3, 3)), "empty the layer"),
        (dict(experts=((1,), ()), num_experts=(0, 4), top_k=1), "no routed experts"),
        (dict(experts=((0, 1, 2),), num_experts=(4,), top_k=2), "top-2"),
        (dict(heads=((0,),), num_heads=(3, 3)), "must list all 2 layers"),
    ],
)
def test_each_part_and_their_combination_are_validated(fields, message):
    layers = len(fields.get("num_experts", ())) or 2
    with pytest.raises(ConfigError, match=message):
        Plan(layers, **fields)


def test_unknown_plan_keys_are_a_clear_error():
    with pytest.raises(ConfigError, match="Unknown plan keys"):
        Plan.from_dict({"num_layers": 2, "block": [1]})


def test_combined_apply_equals_the_masked_original_and_the_parts_in_turn():
    original = tiny_model("llama")
    plan = _combined(original)
    adapter = adapter_for(original)
    removed = {"heads": plan.heads, "channels": plan.channels}
    with width_masked(original, adapter, removed), masked(original, adapter, plan.units):
        expected = _logits(original)
    combined = apply_plan(copy.deepcopy(original), plan)
    torch.testing.assert_close(_logits(combined), expected, rtol=0, atol=1e-5)
    in_turn = copy.deepcopy(original)
    apply_plan(in_turn, plan.part("width"))
    apply_plan(in_turn, plan.part("depth"))
    assert torch.equal(_logits(combined), _logits(in_turn))  # the same surgery, exactly
    # depth first, then the width cut renumbered to the kept layers: the same model again
    depth_first = apply_plan(copy.deepcopy(original), plan.part("depth"))
    kept = plan.kept_layers
    renumbered = Plan.of_widths(
        len(kept),
        tuple(plan.heads[i] for i in kept),
        tuple(plan.channels[i] for i in kept),
        tuple(plan.num_heads[i] for i in kept),
        tuple(plan.num_channels[i] for i in kept),
    )
    apply_plan(depth_first, renumbered)
    assert torch.equal(_logits(combined), _logits(depth_first))


def test_combined_plan_saves_and_reloads_exactly(tmp_path):
    model = tiny_model("llama")
    plan = _combined(model)
    apply_plan(model, plan)
    save_checkpoint(model, None, tmp_path / "m", {"plan": plan.to_dict()})
    record = read_record(tmp_path / "m")
    assert record["structure"]["skipped_branches"] == [[2, "mlp"]]  # layer 3 is now layer 2
    assert (
        record["structure"]["widths"]["channels"][0]
        == widths(model, adapter_for(model))[0].channels
    )
    assert Plan.of_record(record) == plan and not record["loading"]["plain_transformers"]
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


def test_removed_branches_alone_are_not_recorded_as_widths(tmp_path):
    """A removed branch reads as width 0, but the kept branches have the config's widths: the
    record and the loading note name branches only, and the reload is still exact."""
    model = tiny_model("llama")
    apply_plan(model, Plan(LAYERS, attn=(1,), mlp=(2,)))
    save_checkpoint(model, None, tmp_path / "m", {})
    record = read_record(tmp_path / "m")
    assert record["structure"] == {"skipped_branches": [[1, "attn"], [2, "mlp"]]}
    assert "widths" not in record["loading"]["how"]
    reloaded, _ = load_model(tmp_path / "m")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=1e-6)


def test_experts_and_branches_in_one_plan_equal_the_masked_original():
    original = tiny_model("mixtral")
    adapter = adapter_for(original)
    plan = expert_plan(original, {0: (1, 5), 3: (2,)}).merged(Plan(LAYERS, attn=(2,), mlp=(5,)))
    masking = experts_masked(original, adapter, plan.removed_by_layer())
    with masking, masked(original, adapter, plan.units):
        expected = _logits(original)
    pruned = apply_plan(copy.deepcopy(original), plan)
    torch.testing.assert_close(_logits(pruned), expected, rtol=0, atol=1e-6)
    in_turn = copy.deepcopy(original)
    apply_plan(in_turn, plan.part("experts"))
    apply_plan(in_turn, plan.part("depth"))
    assert torch.equal(_logits(pruned), _logits(in_turn))


def test_a_width_record_given_as_plan_cuts_the_same_units(tmp_path):
    """``--plan`` with another run's secateurs.json works for every kind, old formats too."""
    model = tiny_model("llama")
    plan = _combined(model).part("width")
    old = {"width_plan": plan.to_dict(), "criterion": {"name": "magnitude"}}  # an old record
    (tmp_path / "secateurs.json").write_text(json.dumps(old))
    result = prune(model, plan=tmp_path / "secateurs.json", progress=False)
    assert result.plan == plan and result.record["units"] == ["width"]
    assert result.record["plan"] == plan.to_dict()
    expected = tiny_model("llama")
    cut = Cut(expected, plan)
    for layer in range(LAYERS):
        cut.layer(layer)
    assert cut.finish() is False  # per-layer widths: not a plain config
    assert torch.equal(_logits(result.model), _logits(expected))
    assert describe_removed(result.record) == "3 heads in 3 layers; 15 channels in 3 layers"


def test_an_explicit_compensated_width_plan_takes_its_means_from_the_windows():
    model = tiny_model("llama")
    plan = Plan.of_widths(
        LAYERS, ((0,),) + ((),) * 5, ((),) * 6, (3,) * 6, (64,) * 6, compensate=True
    )
    before = _logits(model)
    with pytest.raises(ConfigError, match="need a tokenizer"):  # no windows: refused first
        prune(model, plan=plan.to_dict(), progress=False)
    assert torch.equal(_logits(model), before)
    result = prune(model, plan=plan.to_dict(), calibration=tokens(4, 12), progress=False)
    assert result.plan == plan and result.record["calibration"]["source"] == "tensor"
    bias = model.model.layers[0].self_attn.o_proj.bias
    assert bias is not None and bias.abs().sum() > 0  # the removed group's mean output


# --- depth + width under one budget (--unit block,width) ----------------------------------------
def test_combined_pruning_is_one_budget_and_its_plan_reproduces_the_model():
    model = tiny_model("llama")
    base = decoder_parameters(ResidentSession(model))
    block = sum(p.numel() for p in adapter_for(model).layers(model)[0].parameters())
    result = prune(model, criterion="magnitude", unit="block,width", ratio=0.4, depth_share=0.5)
    plan, params = result.plan, result.record["parameters"]
    assert plan.parts == ("depth", "width") and result.record["units"] == ["depth", "width"]
    assert len(plan.blocks) == round(0.5 * 0.4 * base / block)  # the depth share, in blocks
    assert params["removed_by_depth"] == len(plan.blocks) * block
    assert params["removed_by_depth"] + params["removed_by_width"] == (
        params["before"] - params["after"]
    )
    assert all(not plan.heads[i] and not plan.channels[i] for i in plan.blocks)
    assert len(result.record["width_scores"]["channels"]) == LAYERS  # original indices
    # the recorded plan, applied to the original model, gives the very same model
    again = apply_plan(tiny_model("llama"), Plan.from_dict(result.record["plan"]))
    assert torch.equal(_logits(again), _logits(result.model))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(unit="block,attn"), "block and a width kind"),
        (dict(unit="block,width", criterion="block-influence"), "cannot score heads"),
        (dict(unit="block,width", criterion="fluctuation"), "cannot score block"),
        (dict(unit="block,width", depth_share=0.01), "less than half a block"),
        (dict(unit="block,width", ratio=0.3), "less than half a block"),  # default share
        (dict(unit="block,width", ratio=0.3, depth_share=0.9), "leaving nothing for width"),
        (dict(unit="block,width", depth_share=1.0), r"--depth-share must be in \(0, 1\)"),
    ],
)
def test_bad_combined_input_fails_before_any_work(kwargs, message):
    model = tiny_model("llama")
    before = _logits(model)
    args = {"criterion": "magnitude", "ratio": 0.4, "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=message):
        prune(model, **args)
    assert torch.equal(_logits(model), before)


def test_cli_prunes_blocks_and_width_together(model_dir, calibration_file, tmp_path, capsys):
    out = tmp_path / "both"
    calib = ["--calibration", str(calibration_file), "--n-samples", "4", "--calib-seq-len", "16"]
    flags = ["--unit", "block,width", "--criterion", "block-influence,fluctuation"]
    flags += ["--no-reconstruct"]  # a fit wants more calibration text than this file has
    flags += ["--depth-share", "0.5"]  # the default (0.25) is less than a block here
    code = main(["prune", str(model_dir), *flags, "--ratio", "0.3", *calib, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "removed: block" in printed and "kept MLP channels per layer" in printed
    record = read_record(out)
    assert kind_of(record) == "depth+width" and record["plan"]["blocks"]
    assert record["criterion"]["name"] == "block-influence,fluctuation"
    assert record["parameters"]["depth_share"] == 0.5
    reloaded, _ = load_model(out)
    assert reloaded.config.num_hidden_layers == LAYERS - len(record["plan"]["blocks"])
