"""--heal-damping auto: the ridge chosen on held-out windows, checked against brute force."""

from __future__ import annotations

import pytest
import torch

from secateurs.fit.heal import (
    DAMPING_GRID,
    cross_validated_damping,
    fit_correction,
    residual_energy,
)
from secateurs.run import prune
from tiny_models import tiny_model, tiny_tokenizer, tokens


def _fold(x: torch.Tensor, d: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"gram": x.T @ x, "cross": x.T @ d, "energy": (d * d).sum()}


def _problem(tokens_per_fold: int, noise: float, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    truth = torch.randn(6, 24, generator=generator, dtype=torch.float64)
    folds = []
    for _ in range(2):
        x = torch.randn(tokens_per_fold, 24, generator=generator, dtype=torch.float64)
        d = x @ truth.T + noise * torch.randn(tokens_per_fold, 6, generator=generator,
                                              dtype=torch.float64)  # fmt: skip
        folds.append(_fold(x, d))
    return folds


def test_the_chosen_damping_is_the_brute_force_held_out_minimum():
    folds = _problem(30, noise=3.0)
    best, errors = cross_validated_damping(folds)
    for damp in DAMPING_GRID:
        brute = 0.0
        for held in (0, 1):
            rest = folds[1 - held]
            brute += residual_energy(folds[held], fit_correction(rest["gram"], rest["cross"], damp))
        assert errors[damp] == pytest.approx(brute, rel=1e-6)
    assert best == min(DAMPING_GRID, key=errors.get)


def test_noise_and_few_tokens_ask_for_more_damping_than_clean_plentiful_data():
    noisy, _ = cross_validated_damping(_problem(26, noise=5.0))
    clean, _ = cross_validated_damping(_problem(2000, noise=0.01))
    assert clean < noisy
    assert clean == DAMPING_GRID[0]


def test_auto_damping_is_recorded_per_healed_run(tmp_path):
    source = tmp_path / "llama"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    result = prune(source, blocks="2,3", heal=True, heal_damping="auto", heal_samples=16,
                   batch_size=4, calibration=tokens(16, 12, seed=2), out=tmp_path / "out",
                   progress=False)  # fmt: skip
    (run,) = result.record["healing"]["runs"]
    assert run["damp"] in DAMPING_GRID
    assert min(run["held_out_error"].values()) == run["held_out_error"][str(run["damp"])]
    assert run["error_after"] <= run["error_before"]


def test_the_flag_takes_a_number_or_auto_and_nothing_else(capsys):
    from secateurs.cli import main

    with pytest.raises(SystemExit):
        main(["prune", "smollm2-135m", "--blocks", "3", "--heal", "--heal-damping", "lots",
              "--out", "never"])  # fmt: skip
    assert "expected a number or 'auto', not 'lots'" in capsys.readouterr().err
