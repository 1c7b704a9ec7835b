"""Depth criteria on toy cases with known answers."""

import math

import pytest
import torch

from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.criteria.base import calibration_loss
from secateurs.plan import Unit
from secateurs.run import score
from secateurs.session import ResidentSession
from secateurs.session.flow import Flow
from tiny_models import LAYERS, tiny_model, tokens

IDENTITY_LAYER, QUIET_ATTN = 2, 4


def make_identity(model, layer: int) -> None:
    """Zero the projections that write to the residual stream: the block becomes identity."""
    block = model.model.layers[layer]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


@pytest.fixture
def model():
    model = tiny_model("llama")
    make_identity(model, IDENTITY_LAYER)
    with torch.no_grad():
        model.model.layers[QUIET_ATTN].self_attn.o_proj.weight.zero_()
    return model


@pytest.fixture
def calib():
    return tokens(batch=4, length=16, seed=3)


def scores(model, criterion, unit, calib, batch_size=8, **options):
    extra = {"options": options} if options else {}
    result = score(
        model, calibration=calib, criterion=criterion, unit=unit, batch_size=batch_size, **extra
    )
    return torch.tensor(result.values)


@pytest.mark.parametrize("criterion", ["taylor", "block-influence"])
def test_identity_block_scores_exactly_zero(model, calib, criterion):
    values = scores(model, criterion, "block", calib)
    assert values[IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
    assert (values[[i for i in range(LAYERS) if i != IDENTITY_LAYER]] > 1e-4).all()


def test_ppl_of_identity_block_is_the_full_model_ppl(model, calib):
    values = scores(model, "ppl", "block", calib)
    with torch.no_grad():
        full = math.exp(sum(float(calibration_loss(model, b[None])) for b in calib) / len(calib))
    assert values[IDENTITY_LAYER] == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("criterion", ["taylor", "block-influence"])
def test_silent_attention_branch_scores_zero(model, calib, criterion):
    values = scores(model, criterion, "attn", calib)
    assert values[QUIET_ATTN] == pytest.approx(0.0, abs=1e-6)
    assert values[IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
    assert (values[[0, 1, 3, 5]] > 1e-4).all()


def test_magnitude_is_the_sum_of_absolute_weights(llama):
    values = scores(llama, "magnitude", "mlp", None)
    mlp = llama.model.layers[3].mlp
    expected = sum(
        float(m.weight.detach().abs().sum()) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    )
    assert values[3] == pytest.approx(expected, rel=1e-9)
    squared = scores(llama, "magnitude", "mlp", None, p=2)
    assert squared[3] == pytest.approx(
        sum(
            float(m.weight.detach().pow(2).sum())
            for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        ),
        rel=1e-9,
    )


def test_taylor_uses_signed_gradient_sum(llama, calib):
    """S = |W ⊙ Σ_b g_b|, not Σ_b |W ⊙ g_b|: check against a direct computation."""
    values = scores(llama, "taylor", "mlp", calib, batch_size=1)
    llama.zero_grad()
    for batch in calib.split(1):
        calibration_loss(llama, batch).backward()
    mlp = llama.model.layers[1].mlp
    norm = llama.model.layers[1].post_attention_layernorm
    params = [*mlp.parameters(), *norm.parameters()]
    expected = sum(float((p.detach() * p.grad).abs().sum()) for p in params)
    llama.zero_grad()
    assert values[1] == pytest.approx(expected, rel=1e-4)


def test_masked_units_stay_masked_while_scoring(model, calib):
    """Iterative pruning masks removed units: an identity block can't hide a real one."""
    base = scores(model, "block-influence", "block", calib)
    session = ResidentSession(model)
    ctx = ScoringContext(session, Flow(session, calib), (Unit(0, "block"),), progress=False)
    values = CRITERIA.get("block-influence")().score(ctx, "block")
    assert math.isinf(values[0])  # a removed block is never scored again
    assert values[IDENTITY_LAYER] == pytest.approx(0.0, abs=1e-6)
    assert not torch.allclose(values[1:], base[1:])


def test_registry_lists_every_criterion_with_units():
    for name, cls in CRITERIA.items():
        assert cls.units, name
        assert cls.summary, name
