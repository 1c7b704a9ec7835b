"""``submodel`` (alias ``forward``): closed-form re-fit errors in loss units measured by
compensated sub-models, forward passes only."""

from __future__ import annotations

import copy

import pytest
import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.submodel import (
    compensation,
    damped_inverse,
    held_out,
    layer_scales,
    measure,
    obs_errors,
    spearman,
)
from secateurs.errors import ConfigError
from secateurs.run import prune
from secateurs.session.lazy import LazyModel
from secateurs.session.resident import token_nll
from secateurs.units.width import output_weight_columns
from tiny_models import scoring_context, tiny_model, tokens

CALIB = tokens(8, 16, seed=3)


def brute_force(x, weight, bias, removed, damping, intercept):
    """The damped LS re-fit of the kept columns, solved directly: (error, fitted kept weight,
    fitted bias). Objective: ‖Z_k Ŵ_kᵀ − Z Ŵᵀ‖²/n + λ(‖W'_k − W_k‖² + ‖W_c‖²), the constant
    λ‖W_c‖² being what the proximal term charges the removed columns."""
    n, n_in = x.shape
    kept = torch.tensor([j for j in range(n_in) if j not in set(removed.tolist())])
    lam = damping * float((x * x).sum(0).mean() / n)
    target = x @ weight.T + (bias if intercept else 0)
    z = torch.cat([x[:, kept], torch.ones(n, 1, dtype=x.dtype)], 1) if intercept else x[:, kept]
    pull = torch.zeros(z.shape[1], z.shape[1], dtype=x.dtype)
    pull.diagonal()[: len(kept)] = lam
    prior = torch.zeros(z.shape[1], weight.shape[0], dtype=x.dtype)
    prior[: len(kept)] = weight[:, kept].T
    solution = torch.linalg.solve(z.T @ z / n + pull, z.T @ target / n + pull @ prior)
    fit = z @ solution
    error = (fit - target).pow(2).sum() / n + lam * (
        (solution[: len(kept)] - weight[:, kept].T).pow(2).sum() + weight[:, removed].pow(2).sum()
    )
    return error, solution[: len(kept)].T, solution[len(kept)] if intercept else None


@pytest.mark.parametrize("intercept", [False, True])
@pytest.mark.parametrize("members", [1, 4])
def test_unit_error_is_the_least_squares_refit_error_of_removing_it(intercept, members):
    generator = torch.Generator().manual_seed(0)
    n, n_in, out, damping = 200, 12, 5, 0.05
    x = torch.randn(n, n_in, generator=generator, dtype=torch.float64) + 0.3
    x[:, 1] += x[:, 0]  # correlated inputs: the re-fit matters
    weight = torch.randn(out, n_in, generator=generator, dtype=torch.float64)
    bias = torch.randn(out, generator=generator, dtype=torch.float64)
    columns = torch.arange(n_in).reshape(-1, members)
    z = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1) if intercept else x
    a_inv = damped_inverse(z.T @ z / n, n_in, damping)
    errors = obs_errors(weight, columns, a_inv)
    for group, cols in enumerate(columns):
        expected, fitted, fitted_bias = brute_force(x, weight, bias, cols, damping, intercept)
        assert torch.allclose(errors[group], expected, rtol=1e-9)
        delta = compensation(weight, cols, a_inv)
        kept = [j for j in range(n_in) if j not in set(cols.tolist())]
        compensated = weight + delta[:, :n_in]
        assert compensated[:, cols].abs().max() < 1e-12  # the removed columns are gone
        assert torch.allclose(compensated[:, kept], fitted, atol=1e-9)
        if intercept:
            assert torch.allclose(bias + delta[:, n_in], fitted_bias, atol=1e-9)


def test_sub_model_losses_are_those_of_the_pruned_and_refitted_model():
    """Each layer's sub-model stream gives exactly the loss of a copy of the model whose output
    projection has the removed groups zeroed and the compensation applied, on the held-out
    windows (the first batch: 4 windows), the fit on the others."""
    model = tiny_model("qwen2")  # o_proj without bias, down_proj without: the delta as a hook
    scorer = CRITERIA.get("forward")(fraction=0.25, streams=2)
    for kind in ("heads", "channels"):
        ctx = scoring_context(model, CALIB, 4)
        measured, base = measure(ctx, kind, scorer, intercept=False)
        assert torch.allclose(base, _window_losses(model, CALIB[:4]), atol=1e-5)
        for layer in (0, 3, 5):
            pruned = copy.deepcopy(model)
            module, columns = ctx.output_projection(layer, kind)
            x = _projection_inputs(model, module, CALIB[4:])
            a_inv = damped_inverse(x.T @ x / len(x), x.shape[1], scorer.damping)
            cols = columns[measured[layer].removed].flatten()
            weight = output_weight_columns(module, False).detach().double()
            assert torch.allclose(measured[layer].errors, obs_errors(weight, columns, a_inv))
            copy_module, _ = scoring_context(pruned).output_projection(layer, kind)
            copy_module.weight.data = (weight + compensation(weight, cols, a_inv)).float()
            expected = _window_losses(pruned, CALIB[:4])
            assert torch.allclose(measured[layer].losses, expected, atol=1e-5), (kind, layer)


def _window_losses(model, ids):
    with torch.no_grad():
        return token_nll(model(input_ids=ids, use_cache=False).logits, ids).mean(-1).double()


def _projection_inputs(model, module, ids):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def test_scores_are_the_removed_error_scaled_to_the_measured_loss_change():
    model = tiny_model("llama")
    ctx = scoring_context(model, CALIB, 4)
    scorer = CRITERIA.get("submodel")()
    scores = scorer.score_width(ctx, "channels")
    measured, base = measure(scoring_context(model, CALIB, 4), "channels", scorer, True)
    changes = ctx.extras["submodel_loss_change"]["channels"]
    for layer, m in enumerate(measured):
        predicted = float(scores[layer][m.removed].sum())
        if changes[layer] > 0:  # scaled so that the removed set predicts what was measured
            assert predicted == pytest.approx(float((m.losses - base).mean()), rel=1e-9)
        assert torch.equal(scores[layer].argsort(), m.errors.argsort())  # a scale per layer
    curve = ctx.extras["submodel_convergence"]["channels"]
    assert [p["windows"] for p in curve] == [
        1,
        2,
        4,
    ]  # held out: the first batch and curve[-1]["spearman"] == 1.0


def test_a_sub_model_that_helps_gets_a_small_positive_scale():
    class Fake:
        def __init__(self, loss):
            self.errors, self.removed = torch.tensor([1.0, 2.0]), torch.tensor([0])
            self.losses = torch.tensor([loss])

    scales = layer_scales([Fake(1.5), Fake(0.9), None, Fake(3.0)], torch.tensor([1.0]))
    assert scales[0] == pytest.approx(0.5) and scales[3] == pytest.approx(2.0)
    assert scales[1] == pytest.approx(0.05)  # a tenth of the smallest positive one


def test_never_calls_backward_and_leaves_the_model_untouched(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("backward called")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    model = tiny_model("llama")  # parameters require grad: nothing may use it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kind in ("heads", "channels"):
        scores = CRITERIA.get("forward")().score_width(scoring_context(model, CALIB, 4), kind)
        assert all((s > 0).all() for s in scores)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3"])
def test_layer_by_layer_scores_equal_whole_model(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "model")
    lazy = LazyModel(tmp_path / "model", attn_implementation="eager")
    scorer = CRITERIA.get("forward")(streams=4)
    for kind in ("heads", "channels"):
        whole = torch.cat(scorer.score_width(scoring_context(model, CALIB, 4), kind))
        layered = torch.cat(scorer.score_width(scoring_context(lazy, CALIB, 4), kind))
        assert torch.allclose(layered, whole, rtol=1e-4, atol=0), (model_type, kind)


def test_streams_at_once_do_not_change_the_scores():
    model = tiny_model("llama")
    run = lambda n: torch.cat(  # noqa: E731
        CRITERIA.get("forward")(streams=n).score_width(scoring_context(model, CALIB, 4), "heads")
    )
    assert torch.allclose(run(1), run(6), rtol=1e-6, atol=0)


def test_global_allocation_ranks_predicted_loss_without_a_sensitivity_probe():
    model = tiny_model("llama")
    result = prune(
        model,
        criterion="forward",
        unit="width",
        ratio=0.25,
        allocation="global",
        calibration=tokens(batch=8, length=16, seed=5),
        progress=False,
    )
    record = result.record
    assert record["criterion"]["registered"] == "submodel"
    assert record["layer_sensitivity"] is None
    assert "per parameter" in record["allocation_rule"]
    assert abs(record["parameters"]["achieved_ratio"] - 0.25) < 0.05
    details = record["criterion"]["details"]
    assert set(details["submodel_convergence"]) == {"heads", "channels"}
    assert torch.isfinite(model(input_ids=tokens()).logits).all()


def test_options_are_validated_and_recorded():
    for bad, match in [
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1}, "fraction"),
        ({"damping": 0}, "damping"),
        ({"streams": 0}, "streams"),
        ({"windows": -1}, "windows"),
    ]:
        with pytest.raises(ConfigError, match=match):
            CRITERIA.get("forward")(**bad)
    assert CRITERIA.canonical("forward") == "submodel"
    options = CRITERIA.get("submodel")(fraction=0.5).options()
    assert options == {
        "fraction": 0.5,
        "damping": 0.01,
        "intercept": None,
        "streams": 32,
        "calibrate": True,
        "windows": 0,
    }
    assert not CRITERIA.get("forward").uses_backward


def test_spearman_of_a_ranking_with_itself_and_its_reverse():
    a = torch.tensor([0.3, 0.1, 0.9, 0.5])
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)


def test_without_calibration_the_scores_are_the_raw_unit_errors_on_every_window():
    model = tiny_model("llama")
    ctx = scoring_context(model, CALIB, 4)
    raw = CRITERIA.get("forward")(calibrate=False).score_width(ctx, "channels")
    assert "submodel_scale" not in ctx.extras
    for layer in (0, 4):
        module, columns = ctx.output_projection(layer, "channels")
        x = _projection_inputs(model, module, CALIB)
        z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)  # llama: an intercept
        a_inv = damped_inverse(z.T @ z / len(z), x.shape[1], 0.01)
        weight = module.weight.detach().double()
        assert torch.allclose(raw[layer], obs_errors(weight, columns, a_inv), rtol=1e-6)


def test_held_out_windows_are_whole_leading_batches_leaving_one_to_fit():
    flow = scoring_context(tiny_model("llama"), CALIB, 2).flow  # 4 batches of 2 windows
    assert [held_out(flow, w) for w in (0, 1, 2, 3, 8)] == [1, 1, 1, 2, 3]
    assert held_out(scoring_context(tiny_model("llama"), CALIB, 8).flow, 0) == 1  # one batch
