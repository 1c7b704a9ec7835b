"""``submodel`` (alias ``forward``): closed-form re-fit errors, in loss units measured on
pruned sub-models (KL per injected output error), forward passes only."""

from __future__ import annotations

import copy

import pytest
import torch

from secateurs.criteria import CRITERIA
from secateurs.criteria.submodel import (
    compensation,
    damped_inverse,
    layer_scales,
    measure,
    measured_batches,
    obs_errors,
    spearman,
)
from secateurs.errors import ConfigError
from secateurs.run import prune
from secateurs.session.lazy import LazyModel
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


@pytest.mark.parametrize("loss, centre", [("kl", False), ("nll", False), ("kl", True)])
def test_sub_model_divergence_and_injected_error_are_those_of_the_pruned_model(loss, centre):
    """Each layer's sub-model gives exactly the KL (``nll``: the next-token NLL change) between
    the model and a copy whose output projection has the removed groups' columns zeroed
    (``centre``: replaced by their calibration mean, as a bias), on the first ``windows``
    windows, and the mean squared change of that projection's output; the errors are the
    closed form's."""
    model = tiny_model("qwen2")
    scorer = CRITERIA.get("forward")(fraction=0.25, windows=4, streams=2, loss=loss, centre=centre)
    for kind in ("heads", "channels"):
        ctx = scoring_context(model, CALIB, 2)
        measured = measure(ctx, kind, scorer, intercept=centre)
        for layer in (0, 3, 5):
            module, columns = ctx.output_projection(layer, kind)
            x = _projection_inputs(model, module, CALIB)
            z = torch.cat([x, x.new_ones(len(x), 1)], 1) if centre else x
            a_inv = damped_inverse(z.T @ z / len(z), x.shape[1], scorer.damping)
            weight = module.weight.detach().double()
            assert torch.allclose(measured[layer].errors, obs_errors(weight, columns, a_inv))
            cols = columns[measured[layer].removed].flatten()
            mean = x[:, cols].mean(0) if centre else torch.zeros(len(cols), dtype=x.dtype)
            pruned = copy.deepcopy(model)
            copy_module, _ = scoring_context(pruned).output_projection(layer, kind)
            bias = (module.weight.detach().double()[:, cols] @ mean).float()
            copy_module.register_forward_hook(lambda m, args, out, b=bias: out + b)
            copy_module.weight.data[:, cols] = 0
            kl, injected = _divergence(model, pruned, CALIB[:4], module, cols, loss, mean)
            assert torch.allclose(measured[layer].divergence, kl, rtol=1e-3, atol=1e-9)
            assert torch.allclose(measured[layer].injected, injected, rtol=1e-4)


def _divergence(model, pruned, ids, module, cols, loss, mean):
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids).logits[:, :-1].double(), -1)
        q = torch.log_softmax(pruned(input_ids=ids).logits[:, :-1].double(), -1)
    x = _projection_inputs(model, module, ids).reshape(len(ids), ids.shape[1], -1)
    change = (x[..., cols] - mean) @ module.weight.detach().double()[:, cols].T
    if loss == "nll":
        divergence = (p - q).gather(-1, ids[:, 1:, None])[..., 0].mean(-1)
    else:
        divergence = (p.exp() * (p - q)).sum(-1).mean(-1)
    return divergence, change.pow(2).sum(-1).mean(-1)


def _projection_inputs(model, module, ids):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen]).double()


def test_scores_are_the_errors_scaled_to_the_measured_divergence_per_injected_error():
    model = tiny_model("llama")
    ctx = scoring_context(model, CALIB, 2)
    scorer = CRITERIA.get("submodel")(windows=0)
    scores = scorer.score_width(ctx, "channels")
    measured = measure(scoring_context(model, CALIB, 2), "channels", scorer, True)
    for layer, m in enumerate(measured):
        scale = float(m.divergence.mean() / m.injected.mean())
        assert torch.allclose(scores[layer], m.errors * scale, rtol=1e-9)
        assert len(m.divergence) == len(CALIB) and (m.divergence > 0).all()
    curve = ctx.extras["submodel_convergence"]["channels"]
    assert [p["windows"] for p in curve] == [1, 2, 4, 8] and curve[-1]["spearman"] == 1.0
    assert len(ctx.extras["submodel_scale"]["channels"]) == len(measured)


def test_a_removal_that_changed_nothing_gets_the_smallest_scale():
    class Fake:
        def __init__(self, kl, injected):
            self.errors, self.removed = torch.tensor([1.0, 2.0]), torch.tensor([0])
            self.divergence, self.injected = torch.tensor([kl]), torch.tensor([injected])

    scales = layer_scales([Fake(1.0, 2.0), Fake(0.0, 0.0), None, Fake(3.0, 1.0)])
    assert scales == [0.5, 0.5, 0.5, 3.0]


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
        ({"loss": "mse"}, "loss must be one of kl, nll"),
    ]:
        with pytest.raises(ConfigError, match=match):
            CRITERIA.get("forward")(**bad)
    assert CRITERIA.canonical("forward") == "submodel"
    options = CRITERIA.get("submodel")(fraction=0.5).options()
    assert options == {
        "fraction": 0.5,
        "damping": 0.01,
        "intercept": None,
        "windows": 4,
        "streams": 32,
        "calibrate": True,
        "loss": "kl",
        "centre": False,
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


def test_sub_models_run_on_whole_leading_batches():
    flow = scoring_context(tiny_model("llama"), CALIB, 2).flow  # 4 batches of 2 windows
    assert [measured_batches(flow, w) for w in (0, 1, 2, 3, 8, 20)] == [4, 1, 1, 2, 4, 4]
