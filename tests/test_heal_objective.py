"""--heal-objective cosine: ReplaceMe's cosine distance, refined from the least-squares ΔW."""

from __future__ import annotations

import pytest
import torch

from secateurs.errors import ConfigError
from secateurs.fit.heal import cosine_correction, fit_correction
from secateurs.run import prune
from tiny_models import tiny_model, tiny_tokenizer, tokens


def _distance(w: torch.Tensor, samples) -> float:
    total = sum(
        (1 - torch.cosine_similarity(h + x @ w.T, h + d, dim=-1)).sum() for x, h, d in samples
    )
    return float(total / sum(len(x) for x, _, _ in samples))


def _samples(seed: int = 0):
    """A run whose contribution D is linear in X plus a per-token rescaling of the stream that
    no linear map of X reproduces: least squares and the cosine distance disagree."""
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randn(8, 12, generator=generator)
    samples = []
    for _ in range(2):
        x = torch.randn(64, 12, generator=generator)
        h = torch.randn(64, 8, generator=generator)
        scale = torch.rand(64, 1, generator=generator) * 3
        samples.append((x, h, x @ truth.T + scale * h))
    return samples


def _least_squares(samples) -> torch.Tensor:
    x = torch.cat([s[0] for s in samples]).double()
    d = torch.cat([s[2] for s in samples]).double()
    return fit_correction(x.T @ x, x.T @ d, 0.0)


def test_the_refinement_lowers_the_cosine_distance_of_the_least_squares_fit():
    samples = _samples()
    start = _least_squares(samples)
    refined, report = cosine_correction(start, samples)
    assert report["least_squares"] == pytest.approx(_distance(start.float(), samples), rel=1e-5)
    assert report["refined"] == pytest.approx(_distance(refined.float(), samples), rel=1e-5)
    assert report["refined"] < 0.9 * report["least_squares"]
    assert report["none"] == pytest.approx(_distance(torch.zeros_like(start).float(), samples))
    assert refined.dtype == start.dtype and refined.shape == start.shape


def test_a_fit_already_at_the_cosine_optimum_is_kept():
    """D exactly linear in X: the least-squares ΔW reproduces the target, distance 0."""
    generator = torch.Generator().manual_seed(1)
    truth = torch.randn(8, 12, generator=generator)
    x, h = torch.randn(64, 12, generator=generator), torch.randn(64, 8, generator=generator)
    samples = [(x, h, x @ truth.T)]
    refined, report = cosine_correction(_least_squares(samples), samples)
    assert report["least_squares"] < 1e-6
    assert report["refined"] <= report["least_squares"]
    torch.testing.assert_close(refined.float(), truth, atol=1e-3, rtol=1e-3)


def _healed(tmp_path, name: str, **options):
    source = tmp_path / "llama"
    if not source.exists():
        tiny_model("llama").save_pretrained(source)
        tiny_tokenizer().save_pretrained(source)
    return prune(source, blocks="2,3", heal=True, heal_samples=16, batch_size=4,
                 calibration=tokens(16, 12, seed=2), out=tmp_path / name, progress=False,
                 **options)  # fmt: skip


def test_a_cosine_healed_run_records_its_distances_and_differs_from_least_squares(tmp_path):
    lsq = _healed(tmp_path, "lsq")
    cosine = _healed(tmp_path, "cosine", heal_objective="cosine")
    healing = cosine.record["healing"]
    assert healing["objective"] == "cosine"
    assert healing["method"].startswith("cosine-distance")
    (run,) = healing["runs"]
    distances = run["cosine_distance"]
    assert distances["refined"] < distances["least_squares"] < distances["none"]
    assert lsq.record["healing"]["objective"] == "lsq"
    assert "cosine_distance" not in lsq.record["healing"]["runs"][0]
    lsq_weight = lsq.model.model.layers[1].mlp.down_proj.weight
    cos_weight = cosine.model.model.layers[1].mlp.down_proj.weight
    assert not torch.equal(lsq_weight, cos_weight)


def test_an_unknown_objective_is_refused_before_any_work():
    from secateurs.spec import FitSpec

    with pytest.raises(ConfigError, match="--heal-objective must be one of"):
        FitSpec(heal=True, heal_objective="l1")


def test_the_objective_without_heal_is_refused(capsys):
    from secateurs.cli import main

    code = main(["prune", "smollm2-135m", "--blocks", "3", "--heal-objective", "cosine",
                 "--out", "never"])  # fmt: skip
    assert code == 2
    assert "--heal-objective applies to --heal only" in capsys.readouterr().err
