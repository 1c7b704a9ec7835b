"""Search objectives: NLL and the coarsened KL from the dense model, exact and layer-wise.

KL values of tiny random models are ~1e-3, and the objective works on float32 log-softmaxes
(as the NLL path does): comparisons with the float64 reference allow 1e-5 absolute.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from secateurs.adapters import adapter_for
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.errors import ConfigError
from secateurs.objectives import DenseKL, objective, with_rest
from secateurs.plan import Unit
from secateurs.run import prune
from secateurs.search import greedy_search
from secateurs.session import ResidentSession
from secateurs.session.flow import Flow
from secateurs.units.depth import masked
from tiny_models import LAYERS, tiny_model, tokens


def full_kl(dense: torch.Tensor, pruned: torch.Tensor) -> float:
    """Mean over predicted tokens of KL(dense ‖ pruned) over the whole vocabulary."""
    p = F.log_softmax(dense[:, :-1].double(), -1)
    q = F.log_softmax(pruned[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def masked_logits(model, ids, units=()):
    with masked(model, adapter_for(model), units), torch.no_grad():
        return model(input_ids=ids).logits


def test_rest_bucket_completes_the_distribution():
    logp = F.log_softmax(torch.randn(3, 5, 40), -1)
    top, _ = logp.topk(7, -1)
    coarse = with_rest(top)
    torch.testing.assert_close(coarse.logsumexp(-1), torch.zeros(3, 5), atol=1e-5, rtol=0)
    full = with_rest(logp)  # every token covered: the rest bucket is (numerically) empty
    assert full[..., -1].max() < -10


def test_kl_with_the_whole_vocabulary_is_the_exact_kl_and_a_lower_bound_below():
    model, ids = tiny_model("llama"), tokens(batch=4, length=12)
    dense = masked_logits(model, ids)
    pruned = masked_logits(model, ids, (Unit(2, "block"),))
    vocab = dense.shape[-1]
    exact = DenseKL(top_k=vocab)
    exact.prepare([(ids, dense)])
    assert math.isclose(exact([(ids, pruned)]), full_kl(dense, pruned), abs_tol=1e-5)
    coarse = DenseKL(top_k=4)
    coarse.prepare([(ids, dense)])
    value = coarse([(ids, pruned)])
    assert 0 < value < full_kl(dense, pruned)  # coarsening loses information (data processing)
    assert abs(coarse([(ids, dense)])) < 1e-6  # the dense model is at distance 0


def test_exact_greedy_search_by_kl_matches_brute_force():
    """The layer-wise search (cached inputs, only later layers run) picks, at every step, the
    block whose removal moves the whole-model predictions least from dense."""
    model, ids = tiny_model("qwen2"), tokens(batch=4, length=12)
    candidates = [Unit(i, "block") for i in range(LAYERS)]
    flow = Flow(ResidentSession(model), ids, batch_size=3)
    vocab = model.config.vocab_size
    state = greedy_search(
        flow, candidates, {u: 1 for u in candidates}, 3, None, objective=DenseKL(vocab)
    )
    dense, removed = masked_logits(model, ids), []
    for _ in range(3):
        live = [u for u in candidates if u not in removed]
        kl = {u: full_kl(dense, masked_logits(model, ids, (*removed, u))) for u in live}
        removed.append(min(kl, key=kl.get))
    assert state.removed == removed
    final = full_kl(dense, masked_logits(model, ids, removed))
    assert math.isclose(state.base, final, abs_tol=1e-5)


def test_one_shot_ppl_criterion_scores_kl_like_the_masked_model():
    model, ids = tiny_model("llama"), tokens(batch=5, length=12)
    session = ResidentSession(model)
    ctx = ScoringContext(session, Flow(session, ids, batch_size=2), (), progress=False)
    vocab = model.config.vocab_size
    scores = CRITERIA.get("ppl")(objective="kl", top_k=vocab).score(ctx, "block")
    dense = masked_logits(model, ids)
    singles = [masked_logits(model, ids, (Unit(i, "block"),)) for i in range(LAYERS)]
    expected = torch.tensor([full_kl(dense, s) for s in singles], dtype=scores.dtype)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    assert expected.max() - expected.min() > 1e-4  # the blocks differ by 10x the tolerance


def test_iterative_prune_records_the_objective():
    model = tiny_model("llama")
    result = prune(
        model,
        criterion="ppl",
        unit="block",
        remove=2,
        iterative=True,
        calibration=tokens(batch=4, length=12),
        options={"objective": "kl", "top_k": 8},
        progress=False,
    )
    search = result.record["search"]
    assert search["objective"] == {"objective": "kl", "top_k": 8}
    assert len(search["calibration_kl"]) == 2 and "calibration_ppl" not in search


def test_bad_objectives_are_refused():
    with pytest.raises(ConfigError, match="Unknown search objective"):
        objective("js")
    with pytest.raises(ConfigError, match="takes no options"):
        objective("nll", top_k=3)
    with pytest.raises(ConfigError, match="top_k"):
        objective("kl", top_k=0)
    with pytest.raises(ConfigError, match="has no option foo; its options: "):
        model = tiny_model("llama")
        options = {"foo": 1}
        prune(
            model, criterion="ppl", remove=1, iterative=True, calibration=tokens(), options=options
        )


def test_greedy_search_defaults_to_kl_and_nll_is_slebs_objective():
    def search(**options):
        result = prune(
            tiny_model("llama"),
            criterion="ppl",
            remove=2,
            iterative=True,
            calibration=tokens(batch=4, length=12),
            progress=False,
            **options,
        )
        return result.record["search"]

    assert search()["objective"] == {"objective": "kl", "top_k": 64}
    nll = search(options={"objective": "nll"})
    assert nll["objective"] == {"objective": "nll"} and len(nll["calibration_ppl"]) == 2
    joint = prune(
        tiny_model("llama"),
        criterion="ppl",
        unit="subblock",
        remove=1,
        calibration=tokens(batch=4, length=12),
        progress=False,
    )
    assert joint.record["search"]["objective"] == {"objective": "nll"}  # the joint search's
