"""``--unit auto``: the joint search's parts, each checked against a plain computation.

- the cost model counts exactly what the cut removes;
- a candidate judged from cached layer inputs scores what a full forward of it scores;
- a variant writes only its kept columns, and the dense genes put the model back bit for bit;
- the evolution keeps the budget and never accepts a worse parent;
- the saved model reloads to the same logits; what auto cannot do is refused before any work.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs import load_model
from secateurs.errors import ConfigError
from secateurs.evolve import (
    MLP_STEPS,
    Evolution,
    Judge,
    Library,
    evolve,
    restore,
    space_of,
)
from secateurs.objectives import DenseKL
from secateurs.run import prune
from secateurs.session.flow import Flow
from secateurs.session.resident import ResidentSession
from secateurs.units.width import output_projection
from tiny_models import tiny_model, tiny_tokenizer, tokens

CALIBRATION = tokens(24, 12, seed=4)
AUTO = dict(unit="auto", generations=4, judge_samples=6, reconstruct_samples=12)


def _count(model, only_new_beside=None) -> int:
    """Decoder parameters (or only those whose names ``only_new_beside`` lacks)."""
    named = model.model.layers.named_parameters() if hasattr(model, "model") else ()
    if hasattr(model, "transformer"):
        named = model.transformer.h.named_parameters()
    if only_new_beside is None:
        return sum(p.numel() for _, p in named)
    return sum(p.numel() for n, p in named if n not in only_new_beside)


def _names(model) -> set[str]:
    body = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return {name for name, _ in body.named_parameters()}


def _source(tmp_path, family="llama"):
    path = tmp_path / family
    tiny_model(family).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _library(model):
    session = ResidentSession(model)
    space = space_of(model, session.adapter)
    generator = torch.Generator().manual_seed(3)
    rankings = {
        "heads": [torch.rand(space.kv, generator=generator) for _ in range(space.num_layers)],
        "channels": [
            torch.rand(space.channels, generator=generator) for _ in range(space.num_layers)
        ],
    }
    library = Library(space)
    library.build(Flow(session, CALIBRATION[:12], 4), rankings)
    return session, space, library


def _random_genome(space, seed):
    rng = random.Random(seed)
    return tuple(
        (rng.randrange(space.kv + 1), rng.randrange(MLP_STEPS + 1)) for _ in range(space.num_layers)
    )


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_the_cost_model_counts_exactly_what_the_cut_removes(family, tmp_path):
    source = _source(tmp_path, family)
    original = AutoModelForCausalLM.from_pretrained(source)
    result = prune(source, ratio=0.3, calibration=CALIBRATION, out=tmp_path / "out",
                   progress=False, **AUTO)  # fmt: skip
    search = result.record["search"]
    # the reconstruction's intercepts are new bias vectors (where the family had none): the
    # budget is that of the units; the biases are the fit's, counted apart
    added = _count(result.model, only_new_beside=_names(original))
    removed = _count(original) - _count(result.model) + added
    assert removed == search["budget"]["removed"]
    assert removed >= search["budget"]["value"]  # the budget is met, never undershot
    kept = {(layer["kv_groups"], layer["mlp_channels"]) for layer in search["layers"]}
    assert kept != {(2, 64)}, "the search removed nothing"


def _full_kl(model, adapter, library, genome, windows) -> float:
    """KL of ``genome`` by a plain forward of the whole model (the reference)."""
    goal = DenseKL()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    restore(model, adapter, library)
    with torch.no_grad():
        goal.prepare([(ids, model(ids).logits) for ids in windows.split(2)])
        for layer, gene in enumerate(genome):
            library.assign(model, adapter, layer, gene)
        kl = goal([(ids, model(ids).logits) for ids in windows.split(2)])
    model.load_state_dict(state)
    return kl


def test_a_candidate_judged_from_the_parents_cache_scores_what_a_full_forward_scores():
    model = tiny_model("llama")
    session, space, library = _library(model)
    windows = CALIBRATION[12:]
    judge = Judge(Flow(session, windows, 2), library)
    for seed in range(4):
        if seed == 2:  # a new parent: its cache replaces the dense one
            judge.adopt(_random_genome(space, 10))
        genome = _random_genome(space, seed)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        full = _full_kl(model, session.adapter, library, genome, windows)
        assert judge(genome) == pytest.approx(full, rel=1e-5, abs=1e-7)
        for name, value in model.state_dict().items():  # the parent is assigned again
            assert torch.equal(value, before[name]), name
    assert judge(judge.parent) == pytest.approx(
        _full_kl(model, session.adapter, library, judge.parent, windows), rel=1e-5, abs=1e-7
    )


def test_a_variant_writes_only_its_kept_columns_and_the_dense_genes_restore_the_model():
    model = tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    session, space, library = _library(model)
    for layer in range(space.num_layers):
        library.assign(model, session.adapter, layer, (1, 4))
    for layer in range(space.num_layers):
        o_proj, columns = output_projection(model, session.adapter, layer, "heads")
        removed_group = library.layers[layer].groups[0]
        assert torch.all(o_proj.weight[:, columns[removed_group]] == 0)
        down, _ = output_projection(model, session.adapter, layer, "channels")
        assert int((down.weight.abs().sum(0) > 0).sum()) == space.kept_channels(4)
    library.assign(model, session.adapter, 0, (0, 0))  # a removed block writes zeros
    assert not output_projection(model, session.adapter, 0, "heads")[0].weight.any()
    restore(model, session.adapter, library)
    for name, value in model.state_dict().items():
        assert torch.equal(value, original[name]), name


class _Separable:
    """A judge whose loss is a sum of known per-layer costs: the best allocation is known."""

    def __init__(self, space, weights):
        self.space, self.weights, self.evaluations = space, weights, 0

    def adopt(self, genome):
        self.parent = genome

    def __call__(self, genome, batches=None):
        self.evaluations += 1
        return sum(
            w * ((self.space.kv - kv) ** 2 + (MLP_STEPS - e) ** 2)
            for w, (kv, e) in zip(self.weights, genome, strict=True)
        )


def test_the_evolution_keeps_the_budget_and_never_takes_a_worse_parent():
    space = space_of(tiny_model("llama"), ResidentSession(tiny_model("llama")).adapter)
    weights = [1.0, 5.0, 0.2, 0.2, 5.0, 1.0]  # cheap layers: 2 and 3
    judge = _Separable(space, weights)
    target = int(0.3 * space.removed(((0, 0),) * space.num_layers))
    found = evolve(judge, space, space.parameters(target), Evolution(generations=60, seed=1))
    kls = [step["kl"] for step in found["history"]]
    assert all(b <= a for a, b in zip(kls, kls[1:], strict=False))
    assert kls[-1] < kls[0]
    assert target <= space.removed(found["genome"])
    assert judge.parent == found["genome"]  # the result is what stays assigned
    genome = found["genome"]
    cut = [space.kv - kv + MLP_STEPS - e for kv, e in genome]
    assert cut[2] + cut[3] > cut[1] + cut[4], genome  # the cheap layers give the most


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(unit="auto", remove=2), "--ratio or --params"),
        (dict(unit="auto", ratio=0.2, mode="sequential"), "sequential"),
        (dict(unit="block", remove=1, generations=3), "--unit auto"),
    ],
)
def test_what_auto_cannot_do_is_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prune(tmp_path / "never-read", out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_the_searched_model_reloads_to_the_same_logits(tmp_path):
    source = _source(tmp_path)
    result = prune(source, ratio=0.25, calibration=CALIBRATION, out=tmp_path / "out",
                   progress=False, **AUTO)  # fmt: skip
    reloaded, _ = load_model(tmp_path / "out")  # layers of different widths: not plain HF
    ids = tokens(2, 10, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, result.model(ids).logits)
    search = json.loads((tmp_path / "out" / "secateurs.json").read_text())["search"]
    card = (tmp_path / "out" / "README.md").read_text()
    judged = f"{search['evaluations']} candidates judged on {search['windows']['judge']} windows"
    assert "search: evolutionary" in card and judged in card and "greedy" not in card


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.35, 0.6])
def test_the_first_parents_meet_the_budget_tightly(fraction):
    from secateurs.evolve import _near_uniform

    space = space_of(tiny_model("llama"), ResidentSession(tiny_model("llama")).adapter)
    goal = space.parameters(fraction * space.removed(((0, 0),) * space.num_layers))
    for kv in range(space.kv + 1):
        genome = _near_uniform(space, goal, kv)
        if genome is None:
            assert space.removed(((kv, 0),) * space.num_layers) < goal.amount
            continue
        assert space.removed(genome) >= goal.amount
        for layer, (a, e) in enumerate(genome):  # no layer could keep one level more
            if e < MLP_STEPS:
                looser = (*genome[:layer], (a, e + 1), *genome[layer + 1 :])
                assert space.removed(looser) < goal.amount
