"""Fast (layer-wise) depth scoring, greedy search, sub-block search, explicit plans, healing."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.errors import ConfigError
from secateurs.fit.heal import fit_correction, runs_of, sublayer_runs
from secateurs.plan import Plan, Unit
from secateurs.run import prune
from secateurs.search import greedy_search, merge_branches, unit_params
from secateurs.session import ResidentSession
from secateurs.session.flow import Flow
from secateurs.spec import PruneSpec
from secateurs.units import apply_plan
from secateurs.units.depth import masked
from tiny_models import LAYERS, TINY_CONFIGS, tiny_model, tokens

REMOVED = (Unit(2, "block"), Unit(4, "mlp"), Unit(1, "attn"))


def ppl_scores(model, unit, removed, batch=5):
    session = ResidentSession(model)
    flow = Flow(session, tokens(batch=batch, length=12), batch_size=2)
    ctx = ScoringContext(session, flow, removed, progress=False)
    return CRITERIA.get("ppl")().score(ctx, unit)


def masked_ppl(model, unit, removed, batch=5):
    """The reference: the whole model with the units masked, one forward per window."""
    ids = tokens(batch=batch, length=12)
    scores = []
    for layer in range(LAYERS):
        if Unit(layer, unit) in removed:
            scores.append(math.inf)
            continue
        scores.append(math.exp(masked_nll(model, ids, [*removed, Unit(layer, unit)])))
    return torch.tensor(scores, dtype=torch.float64)


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_ppl_through_the_flow_equals_masked_whole_model(model_type):
    model = tiny_model(model_type)
    for unit in ("block", "attn", "mlp"):
        for removed in ((), REMOVED):
            fast = ppl_scores(model, unit, removed)
            reference = masked_ppl(model, unit, removed)
            assert torch.equal(torch.isinf(fast), torch.isinf(reference))
            live = torch.isfinite(reference)
            torch.testing.assert_close(fast[live], reference[live], rtol=1e-5, atol=0)
            assert reference[live].std() > 0  # the units differ, so equality means something


def masked_nll(model, ids, units):
    with masked(model, adapter_for(model), units), torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1]
    return float(
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    )


def test_cached_inputs_from_a_layer_equal_a_full_pass():
    model = tiny_model("gemma2")  # per-layer sliding-window masks
    session = ResidentSession(model)
    flow = Flow(session, tokens(batch=3, length=10), batch_size=2)
    flow.keep_inputs = True
    flow.inputs(LAYERS - 1)
    flow.set_base(REMOVED[:1])  # invalidates the inputs after layer 2
    partial = [flow.inputs(i) for i in range(LAYERS)]
    fresh = Flow(session, tokens(batch=3, length=10), batch_size=2)
    fresh.set_base(REMOVED[:1])
    for index, cached in enumerate(partial):
        for a, b in zip(cached, fresh.inputs(index), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def brute_force_greedy(model, ids, candidates, count):
    removed = []
    for _ in range(count):
        live = [c for c in candidates if c not in removed]
        removed.append(min(live, key=lambda c: (masked_nll(model, ids, [*removed, c]), c)))
    return removed


def test_exact_greedy_search_matches_brute_force():
    model, ids = tiny_model("qwen2"), tokens(batch=4, length=12)
    candidates = [Unit(i, "block") for i in range(LAYERS)]
    flow = Flow(ResidentSession(model), ids, batch_size=3)
    state = greedy_search(flow, candidates, {u: 1 for u in candidates}, 3, shortlist=None)
    assert state.removed == brute_force_greedy(model, ids, candidates, 3)
    assert math.isclose(state.base, masked_nll(model, ids, state.removed), rel_tol=1e-5)


def test_shortlist_rescoring_counts():
    model, ids = tiny_model("llama"), tokens(batch=4, length=12)
    candidates = [Unit(i, "block") for i in range(1, LAYERS)]
    flow = Flow(ResidentSession(model), ids)
    state = greedy_search(flow, candidates, {u: 1 for u in candidates}, 3, shortlist=2)
    assert [len(step["nll"]) for step in state.steps] == [5, 2, 2]
    assert len(set(state.removed)) == 3 and all(u.layer >= 1 for u in state.removed)


def test_subblock_search_meets_parameter_budget_and_equals_masked(tmp_path):
    model, ids = tiny_model("llama"), tokens(batch=4, length=12)
    original, adapter = copy.deepcopy(model), adapter_for(model)
    block = unit_params(model, adapter, Unit(0, "block"))
    result = prune(
        model,
        criterion="ppl",
        unit="subblock",
        remove=2,
        calibration=ids,
        progress=False,
        out=tmp_path / "out",
    )
    removed = result.record["parameters"]["before"] - result.record["parameters"]["after"]
    smallest = min(unit_params(original, adapter, Unit(0, k)) for k in ("attn", "mlp"))
    assert abs(removed - 2 * block) <= smallest // 2
    assert result.record["search"]["budget"]["counts"] == "parameters"
    plain = not (result.plan.attn or result.plan.mlp)
    assert result.record["engines"]["hf"]["expressible"] is plain
    x = tokens()
    with masked(original, adapter, result.plan.units), torch.no_grad():
        expected = original(x).logits
    with torch.no_grad():
        torch.testing.assert_close(result.model(x).logits, expected, rtol=0, atol=1e-5)


def test_merge_branches_makes_blocks():
    units = [Unit(3, "attn"), Unit(1, "mlp"), Unit(3, "mlp"), Unit(2, "block")]
    assert merge_branches(units) == [Unit(1, "mlp"), Unit(2, "block"), Unit(3, "block")]


def test_explicit_selection_needs_no_scoring(tmp_path):
    model = tiny_model("llama")
    result = prune(model, blocks="1,3", mlp="4", out=tmp_path / "a", progress=False)
    assert result.plan == Plan(LAYERS, blocks=(1, 3), mlp=(4,))
    assert result.record["criterion"]["name"] == "explicit" and result.record["scores"] == []
    again = PruneSpec.from_options(plan=str(tmp_path / "a" / "secateurs.json"))
    assert again.selection.plan_for(LAYERS) == Plan(LAYERS, blocks=(1, 3), mlp=(4,))
    (tmp_path / "p.json").write_text(json.dumps({"num_layers": LAYERS, "attn": [2]}))
    bare = PruneSpec.from_options(plan=str(tmp_path / "p.json"))
    assert bare.selection.plan_for(LAYERS) == Plan(LAYERS, attn=(2,))


@pytest.mark.parametrize(
    "kwargs",
    [dict(blocks="1", remove=2), dict(blocks="1", plan={"blocks": [2]}), dict(blocks="1,x")],
)
def test_explicit_selection_bad_input(kwargs):
    with pytest.raises(ConfigError):
        prune(tiny_model("llama"), progress=False, **kwargs)


def test_runs_of_consecutive_blocks():
    assert runs_of((4, 5, 7, 12, 13, 14)) == [(4, 5), (7, 7), (12, 14)]


def test_fit_correction_recovers_an_exact_linear_map():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, generator=generator, dtype=torch.float64)
    true = torch.randn(8, 16, generator=generator, dtype=torch.float64)
    delta = fit_correction(x.T @ x, x.T @ (x @ true.T), damp=0.0)
    torch.testing.assert_close(delta, true)


def test_healing_reproduces_an_exactly_linear_removed_block():
    """Block 2 adds M·x where x is block 1's down_proj input: healing must absorb it exactly."""
    model, ids = tiny_model("llama"), tokens(batch=8, length=16)  # 128 tokens > 64 channels
    layers = adapter_for(model).layers(model)
    linear = torch.randn(32, 64, generator=torch.Generator().manual_seed(3)) * 0.1
    seen, by_output = {}, {}  # x of block 1, by the output block 1 gave with it

    def key(hidden):
        return hidden.detach().numpy().tobytes()

    layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    layers[1].register_forward_hook(lambda m, a, out: by_output.__setitem__(key(out), seen["x"]))
    layers[2].forward = lambda hidden, *a, **k: hidden + by_output[key(hidden)] @ linear.T
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    result = prune(model, blocks="2", heal=True, heal_damping=0.0, calibration=ids, progress=False)
    (run,) = result.record["healing"]["runs"]
    assert run["error_after"] < 1e-8 * run["error_before"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("bias", "target"), [(False, "local"), (True, "local"), (False, "dense")])
def test_healed_checkpoint_reloads_plain_and_reduces_reconstruction_error(tmp_path, bias, target):
    model, ids = tiny_model("llama"), tokens(batch=4, length=12)
    result = prune(
        model,
        blocks="2,3,5",
        heal=True,
        heal_bias=bias,
        heal_target=target,
        calibration=ids,
        out=tmp_path / "h",
        progress=False,
    )
    runs = result.record["healing"]["runs"]
    assert result.record["healing"]["target"] == target
    assert [r["blocks"] for r in runs] == [[2, 3], [5, 5]]
    assert all(r["error_after"] <= r["error_before"] for r in runs)
    assert runs[0]["error_after"] < runs[0]["error_before"]  # the fit does something
    assert result.model.config.mlp_bias is bias
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "h")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, result.model(x).logits, rtol=0, atol=1e-5)
        unhealed = apply_plan(tiny_model("llama"), result.plan)
        assert not torch.allclose(unhealed(x).logits, result.model(x).logits, atol=1e-4)


def test_dense_target_also_corrects_the_drift_of_earlier_runs():
    """The first run sees the dense stream either way; a later one's target differs."""
    ids = tokens(batch=4, length=12)
    runs = {
        target: prune(
            tiny_model("llama"), blocks="2,3,5", heal=True, heal_target=target, calibration=ids
        ).record["healing"]["runs"]
        for target in ("local", "dense")
    }
    assert runs["local"][0]["error_before"] == pytest.approx(runs["dense"][0]["error_before"])
    assert runs["local"][1]["error_before"] != pytest.approx(runs["dense"][1]["error_before"])


def test_cli_depth_flags(model_dir, calibration_file, tmp_path, capsys):
    from secateurs.cli import main

    calib = ["--calibration", str(calibration_file), "--n-samples", "4", "--calib-seq-len", "16"]
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--blocks",
                "2,3",
                "--heal",
                "--heal-samples",
                "8",
                *calib,
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "a" / "secateurs.json").read_text())
    assert record["plan"]["blocks"] == [2, 3] and record["criterion"]["name"] == "explicit"
    assert record["healing"]["runs"][0]["into_layer"] == 1
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--criterion",
                "ppl",
                "--iterative",
                "--remove",
                "2",
                "--shortlist",
                "1",
                *calib,
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    search = json.loads((tmp_path / "b" / "secateurs.json").read_text())["search"]
    assert search["scored_per_step"] == [LAYERS, 1] and search["shortlist"] == 1
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--unit",
                "subblock",
                "--criterion",
                "ppl",
                "--params",
                "3000",
                *calib,
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "c" / "secateurs.json").read_text())
    assert record["search"]["budget"] == {"value": 3000, "counts": "parameters"}
    code = main(
        ["prune", str(model_dir), "--blocks", "1", "--remove", "2", "--out", str(tmp_path / "d")]
    )
    assert code != 0 and "explicit" in capsys.readouterr().err


def test_search_records_first_step_scores_for_plots():
    model, ids = tiny_model("llama"), tokens(batch=4, length=12)
    result = prune(
        model,
        criterion="ppl",
        iterative=True,
        remove=2,
        protect="0,-1",
        calibration=ids,
        progress=False,
    )
    (scores,) = result.scores
    assert scores.unit == "block" and len(scores.values) == LAYERS
    assert math.isinf(scores.values[0]) and math.isinf(scores.values[-1])
    assert all(math.isfinite(v) for v in scores.values[1:-1])
    steps = result.record["search"]["steps"]
    assert [len(s["nll"]) for s in steps] == [LAYERS - 2, 3]


# --- healing of branch runs ---------------------------------------------------------------------
def _hand_fit(model, ids, layer, kind):
    """X and D of one removed branch, by hand on the dense model: the inputs of the projection
    before it (this layer's o_proj for an MLP, the previous layer's down_proj for attention)
    and the branch's own contribution to the stream."""
    layers = adapter_for(model).layers(model)
    if kind == "mlp":
        into, branch = layers[layer].self_attn.o_proj, layers[layer].mlp
    else:
        into, branch = layers[layer - 1].mlp.down_proj, layers[layer].self_attn.o_proj
    seen = {}
    handles = [
        into.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
        branch.register_forward_hook(lambda m, a, out: seen.__setitem__("d", out)),
    ]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()
    d = seen["d"].reshape(-1, 32).double()
    return into.weight.detach().clone(), fit_correction(x.T @ x, x.T @ d, damp=0.0)


@pytest.mark.parametrize(("kind", "into_layer"), [("mlp", 2), ("attn", 1)])
def test_a_removed_branch_is_healed_into_the_projection_before_it(kind, into_layer):
    """MLP 2 heals into layer 2's o_proj, attention 2 into layer 1's down_proj: the correction
    is the least-squares fit of the branch's contribution on those inputs (by hand here), and
    never raises the error on the windows."""
    model, ids = tiny_model("llama"), tokens(batch=8, length=16)
    weight, delta = _hand_fit(model, ids, 2, kind)
    result = prune(model, **{kind: "2"}, heal=True, heal_damping=0.0, calibration=ids,
                   progress=False)  # fmt: skip
    (run,) = result.record["healing"]["runs"]
    assert run["sublayers"] == [[2, kind]] and run["into_layer"] == into_layer
    assert run["into"] == ("o_proj" if kind == "mlp" else "down_proj")
    assert run["error_after"] < run["error_before"]
    layers = adapter_for(model).layers(model)
    healed = layers[2].self_attn.o_proj if kind == "mlp" else layers[1].mlp.down_proj
    torch.testing.assert_close(healed.weight - weight, delta.float(), rtol=1e-3, atol=1e-5)


def test_runs_cross_layers_and_skip_what_a_linear_fit_cannot_absorb():
    plan = Plan(LAYERS, blocks=(2,), attn=(3,), mlp=(0, 5))
    runs = [(r.target, r.removed) for r in sublayer_runs(plan)]
    assert runs == [
        ((0, "attn"), ((0, "mlp"),)),
        ((1, "mlp"), ((2, "attn"), (2, "mlp"), (3, "attn"))),
        ((5, "attn"), ((5, "mlp"),)),
    ]
    skipped = prune(tiny_model("gemma2"), blocks="2", heal=True, calibration=tokens(4, 12))
    assert "normalises branch outputs" in skipped.record["healing"]["runs"][0]["skipped"]
    parallel = prune(tiny_model("gpt_neox"), mlp="2", heal=True, calibration=tokens(4, 12))
    assert "parallel-residual" in parallel.record["healing"]["runs"][0]["skipped"]


def test_width_and_depth_are_healed_and_reconstructed_together(tmp_path):
    """block,width with --heal: the widths are re-fitted in their layers and the removed
    blocks healed into the (re-fitted) projection before them, in one pass."""
    model, ids = tiny_model("llama"), tokens(batch=16, length=12)
    result = prune(
        model,
        unit="block,width",
        criterion="block-influence,activation",
        ratio=0.4,
        depth_share=0.5,
        protect="none",
        heal=True,
        calibration=ids,
        progress=False,
    )
    record = result.record  # fmt: skip
    assert record["reconstruction"]["enabled"] and record["healing"]["runs"]
    healed = [r for r in record["healing"]["runs"] if "skipped" not in r]
    assert healed and all(r["error_after"] <= r["error_before"] for r in healed)
