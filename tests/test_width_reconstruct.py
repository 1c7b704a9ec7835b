"""Reconstruction after width pruning: exact where the kept inputs span the removed ones, never
worse than slicing (or FLAP) on the calibration data, standard checkpoints, every adapter."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.checkpoint import read_record
from secateurs.errors import UnsupportedModelError
from secateurs.fit.reconstruct import NormalEquations, TokenSystem, refit
from secateurs.plan import Plan
from secateurs.run import prune
from secateurs.units.width import group_slices, output_projection, output_weight_columns, widths
from tiny_models import LAYERS, TINY_CONFIGS, tiny_model, tokens

CALIBRATION = dict(batch=8, length=16, seed=5)  # 128 tokens: more than any layer's inputs


def _plan(model, heads, channels) -> Plan:
    ws = widths(model, adapter_for(model))
    n = len(ws)
    return Plan.of_widths(
        n,
        tuple(heads or [()] * n),
        tuple(channels or [()] * n),
        tuple(w.kv_heads for w in ws),
        tuple(w.channels for w in ws),
    )


@torch.no_grad()
def _duplicate_unit(model, kind: str, source: int, copy: int) -> None:
    """Make unit ``copy`` of every layer compute exactly what unit ``source`` computes."""
    adapter = adapter_for(model)
    for layer in range(adapter.num_layers(model)):
        for piece in group_slices(model, adapter, layer, kind)[:-1]:  # not the output columns
            src = piece.index[source].to(piece.param.device)
            dst = piece.index[copy].to(piece.param.device)
            piece.param.index_copy_(piece.dim, dst, piece.param.index_select(piece.dim, src))


def _width_supported(adapter, kind, config) -> bool:
    try:
        adapter.width_layout(kind, config)
    except UnsupportedModelError:
        return False
    return True


def reconstruct_plan(model, plan, calibration, damping=0.01) -> dict:
    """Cut ``plan`` out of ``model`` with reconstruction: the run's reconstruction record."""
    result = prune(
        model, plan=plan.to_dict(), calibration=calibration, reconstruct_damping=damping,
        progress=False,
    )  # fmt: skip
    return result.record["reconstruction"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# BLOOM's ALiBi slopes differ per head: two heads with equal weights still differ.
@pytest.mark.parametrize("model_type", list(TINY_CONFIGS))
def test_linearly_redundant_units_are_reconstructed_exactly(model_type):
    model = tiny_model(model_type)
    adapter = adapter_for(model)
    kinds = [k for k in ("heads", "channels") if _width_supported(adapter, k, model.config)]
    if model_type == "bloom":
        kinds = [k for k in kinds if k != "heads"]
    if not kinds:
        pytest.skip(f"{model_type} has no width support")
    for kind in kinds:
        _duplicate_unit(model, kind, 0, 1)
    ids = tokens(3, 12, seed=2)
    expected = _logits(model, ids)
    one = [(1,)] * LAYERS
    plan = _plan(model, one if "heads" in kinds else None, one if "channels" in kinds else None)
    record = reconstruct_plan(model, plan, tokens(**CALIBRATION), damping=0.0)
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-4, rtol=1e-4)
    assert len(record["layers"]) == LAYERS * len(kinds)
    assert max(r["relative_error_reconstructed"] for r in record["layers"]) < 1e-6
    assert max(r["relative_error_sliced"] for r in record["layers"]) > 1e-4  # slicing alone is not


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "phi3", "opt"])
def test_reconstruction_never_increases_the_layer_output_error(model_type):
    model = tiny_model(model_type)
    w = widths(model, adapter_for(model))[0]
    channels = [tuple(range(layer % 3, w.channels, 3)) for layer in range(LAYERS)]
    heads = [((layer % w.kv_heads),) for layer in range(LAYERS)]
    plan = _plan(model, heads, channels)
    record = reconstruct_plan(model, plan, tokens(**CALIBRATION))
    for row in record["layers"]:
        assert row["relative_error_reconstructed"] <= row["relative_error_sliced"] + 1e-9, row


def test_layer_error_is_the_least_squares_optimum_and_beats_flap():
    """Recompute layer 0's fit by hand from the original model's inputs (its inputs are the
    pruned model's too): error reconstructed ≤ FLAP's mean compensation ≤ plain slicing."""
    model = tiny_model("llama")
    adapter = adapter_for(model)
    calib = tokens(**CALIBRATION)
    module, _ = output_projection(model, adapter, 0, "channels")
    seen = []
    handle = module.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 64)))
    _logits(model, calib)
    handle.remove()
    x = torch.cat(seen).double()
    weight = output_weight_columns(module, False).detach().double()
    removed = torch.arange(0, 64, 4)
    kept = torch.tensor([i for i in range(64) if i % 4])
    z = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    fit = refit(x, weight, None, kept, damping=0.0, intercept=True)
    target = x @ weight.T
    error = lambda y: float(((y - target) ** 2).sum() / (target**2).sum())  # noqa: E731
    lstsq = torch.linalg.lstsq(z[:, list(kept) + [64]], target).solution
    assert error(z[:, list(kept) + [64]] @ lstsq) == pytest.approx(fit.error_after, rel=1e-6)
    flap = x[:, kept] @ weight[:, kept].T + weight[:, removed] @ x[:, removed].mean(0)
    sliced = x[:, kept] @ weight[:, kept].T
    assert fit.error_after < error(flap) < error(sliced)
    assert fit.error_before == pytest.approx(error(sliced), rel=1e-6)


def test_damping_pulls_towards_the_sliced_weights():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 6, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5])
    loose = refit(x, weight, None, kept, 0.0, False)
    stiff = refit(x, weight, None, kept, 1e6, False)
    torch.testing.assert_close(stiff.weight, weight[:, kept], atol=1e-4, rtol=1e-4)
    assert loose.error_after <= stiff.error_after <= stiff.error_before + 1e-12


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_prune_width_records_reconstruction_and_saves_a_standard_checkpoint(model_type, tmp_path):
    """Mistral has no bias flag: the fit has no intercept, the checkpoint stays standard."""
    model = tiny_model(model_type)
    result = prune(
        model,
        criterion="activation",
        unit="width",
        ratio=0.3,
        reconstruct=True,
        calibration=tokens(**CALIBRATION),
        out=tmp_path / "m",
        progress=False,
    )
    record = read_record(tmp_path / "m")
    rec = record["reconstruction"]
    assert rec["enabled"] and rec["tokens"] == 128
    assert rec["intercept"] == {"heads": model_type == "llama", "channels": model_type == "llama"}
    assert {r["layer"] for r in rec["layers"]} == set(range(LAYERS))
    assert record["plan"]["compensate"] is False  # the intercept replaces FLAP's bias
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager")
    ids = tokens()
    torch.testing.assert_close(_logits(reloaded.eval(), ids), _logits(result.model, ids))


def test_no_reconstruct_and_bad_damping():
    from secateurs.errors import ConfigError

    with pytest.raises(ConfigError, match="damping"):
        prune(tiny_model("llama"), unit="width", ratio=0.3, reconstruct_damping=-1.0)
    model = tiny_model("llama")
    result = prune(
        model,
        criterion="magnitude",
        unit="width",
        ratio=0.3,
        reconstruct=False,
        calibration=tokens(**CALIBRATION),
        progress=False,
    )
    assert result.record["reconstruction"] == {"enabled": False}


def test_reconstruction_is_on_by_default_where_calibration_can_be_had(caplog):
    width = dict(criterion="magnitude", unit="width", ratio=0.3, progress=False)
    with_data = prune(tiny_model("llama"), calibration=tokens(**CALIBRATION), **width)
    assert with_data.record["reconstruction"]["enabled"] is True
    with caplog.at_level(logging.WARNING, logger="secateurs.fit"):
        data_free = prune(tiny_model("llama"), **width)  # no tokenizer, no windows
    assert data_free.record["reconstruction"] == {"enabled": False}
    assert "not reconstructed" in caplog.text


@pytest.mark.parametrize(("criterion", "reconstruct", "warned"), [
    ("influence", False, True),
    ("influence", True, False),
    ("fluctuation", False, False),
])  # fmt: skip
def test_a_criterion_that_predicts_the_reconstructed_model_warns_without_it(
    criterion, reconstruct, warned, caplog
):
    with caplog.at_level(logging.WARNING, logger="secateurs.choose"):
        prune(
            tiny_model("llama"),
            criterion=criterion,
            unit="width",
            ratio=0.3,
            reconstruct=reconstruct,
            calibration=tokens(**CALIBRATION),
            progress=False,
        )
    assert ("ranks units by the loss after reconstruction" in caplog.text) is warned


def test_large_systems_are_fitted_in_float32_and_still_reproduce_redundant_units(monkeypatch):
    """Above ``FLOAT64_BYTES`` the normal equations are float32 (a 14B MLP's would be 1.4 GB in
    float64): the redundant units are still reproduced, and each fit records its precision."""
    monkeypatch.setattr("secateurs.fit.reconstruct.FLOAT64_BYTES", 0)
    model = tiny_model("llama")
    _duplicate_unit(model, "channels", 0, 1)
    ids = tokens(3, 12, seed=2)
    expected = _logits(model, ids)
    plan = _plan(model, None, [(1,)] * LAYERS)
    record = reconstruct_plan(model, plan, tokens(**CALIBRATION), damping=0.0)
    assert {row["precision"] for row in record["layers"]} == {"float32"}
    assert max(r["relative_error_reconstructed"] for r in record["layers"]) < 1e-4
    torch.testing.assert_close(_logits(model, ids), expected, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("intercept", [False, True])
@pytest.mark.parametrize("tokens_in", [20, 60])  # fewer and more tokens than kept columns
def test_the_dual_form_gives_the_normal_equations_solution(intercept, tokens_in):
    """Δᵀ = Zᵀ(ZZᵀ + λI)⁻¹R (an n × n system, for a 14B MLP fitted on few tokens) is the same
    damped fit as the k × k normal equations, intercept (centring) included, with the same
    measured errors."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens_in, 64, generator=generator) * torch.rand(64, generator=generator)
    weight, bias = torch.randn(24, 64, generator=generator), torch.randn(24, generator=generator)
    kept = torch.arange(0, 60, 2)
    fits = []
    for form in (NormalEquations, TokenSystem):
        system = form(weight, bias, kept, intercept)
        system.add(x)
        system.solve(0.01)
        system.measure(x)
        fits.append(system.result())
    primal, dual = fits
    torch.testing.assert_close(dual.weight.double(), primal.weight.double(), atol=2e-6, rtol=0)
    if intercept:
        torch.testing.assert_close(dual.bias.double(), primal.bias.double(), atol=2e-6, rtol=0)
    assert dual.error_before == primal.error_before
    assert dual.error_after == pytest.approx(primal.error_after, rel=1e-6)


def test_a_large_fit_on_fewer_tokens_than_columns_takes_the_dual_form(monkeypatch):
    """Where the normal equations would be large and fewer tokens than kept columns come, the
    fit is solved in its dual form (recorded); undamped, it reproduces every layer's output on
    those tokens exactly, so the model's logits on them too (elsewhere the under-determined fit
    is free)."""
    monkeypatch.setattr("secateurs.fit.reconstruct.FLOAT64_BYTES", 0)
    model = tiny_model("llama")
    _duplicate_unit(model, "channels", 0, 1)
    few = tokens(batch=2, length=8, seed=5)  # 16 tokens, fewer than the kept channels
    expected = _logits(model, few)
    plan = _plan(model, None, [(1,)] * LAYERS)
    record = reconstruct_plan(model, plan, few, damping=0.0)
    assert {row["form"] for row in record["layers"]} == {"dual (tokens < kept columns)"}
    assert max(r["relative_error_reconstructed"] for r in record["layers"]) < 1e-8
    torch.testing.assert_close(_logits(model, few), expected, atol=1e-4, rtol=1e-4)
