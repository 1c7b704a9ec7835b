"""The CLI over the API: prune with a recipe and overrides, score → prune --scores, eval ppl."""

import json

import torch
from transformers import AutoModelForCausalLM

from secateurs.cli import main


def calib_flags(calibration_file):
    return ["--calibration", str(calibration_file), "--n-samples", "4", "--calib-seq-len", "16"]


def test_ls_lists_registries(capsys):
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for name in (
        "ppl",
        "taylor",
        "block-influence",
        "magnitude",
        "llama",
        "gpt_neox",
        "wikitext2",
        "smollm2-135m",
    ):
        assert name in out


def test_prune_with_recipe_and_override(model_dir, calibration_file, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {model_dir}\ncriterion: block-influence\nremove: 1\nout: {tmp_path / 'a'}\n"
    )
    assert (
        main(["prune", "--config", str(recipe), *calib_flags(calibration_file), "--remove", "2"])
        == 0
    )
    record = json.loads((tmp_path / "a" / "secateurs.json").read_text())
    assert record["criterion"]["name"] == "block-influence" and len(record["plan"]["blocks"]) == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "a").config.num_hidden_layers == 4
    assert "removed: block" in capsys.readouterr().out


def test_unknown_recipe_key_is_an_error(model_dir, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("critrion: ppl\n")
    code = main(
        [
            "prune",
            str(model_dir),
            "--config",
            str(recipe),
            "--remove",
            "1",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "unknown options ['critrion']" in capsys.readouterr().err


def test_score_needs_no_removable_block(model_dir, calibration_file, tmp_path):
    """``ppl+`` protects all 6 layers of the tiny model: nothing could be removed, yet scoring
    removes nothing, so every layer is scored (a placeholder budget must not be checked)."""
    scores = tmp_path / "scores.json"
    argv = ["score", str(model_dir), "--criterion", "ppl+", "--out", str(scores)]
    assert main([*argv, *calib_flags(calibration_file)]) == 0
    assert len(json.loads(scores.read_text())["values"]) == 6


def test_score_then_prune_with_saved_scores(model_dir, calibration_file, tmp_path):
    scores = tmp_path / "scores.json"
    assert (
        main(
            [
                "score",
                str(model_dir),
                "--criterion",
                "taylor",
                "--unit",
                "mlp",
                "--out",
                str(scores),
                *calib_flags(calibration_file),
            ]
        )
        == 0
    )
    values = json.loads(scores.read_text())["values"]
    assert len(values) == 6
    assert (
        main(
            [
                "prune",
                str(model_dir),
                "--criterion",
                "taylor",
                "--unit",
                "mlp",
                "--remove",
                "2",
                "--scores",
                str(scores),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "b" / "secateurs.json").read_text())
    expected = sorted(sorted(range(6), key=values.__getitem__)[:2])
    assert record["plan"]["mlp"] == expected
    assert record["loading"]["plain_transformers"] is False


def test_existing_output_gives_exit_code_2(model_dir, tmp_path, capsys):
    (tmp_path / "exists").mkdir()
    code = main(
        [
            "prune",
            str(model_dir),
            "--criterion",
            "magnitude",
            "--remove",
            "1",
            "--out",
            str(tmp_path / "exists"),
        ]
    )
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err


def test_eval_ppl_save_merges_into_results_json(model_dir, data_dir):
    flags = ["--seq-len", "16", "--max-windows", "2", "--data-dir", str(data_dir), "--save"]
    assert main(["eval", "ppl", str(model_dir), "--dataset", "wikitext2", *flags]) == 0
    assert main(["eval", "ppl", str(model_dir), "--dataset", "ptb", *flags]) == 0
    saved = json.loads((model_dir / "results.json").read_text())["ppl"]
    assert set(saved) == {"wikitext2", "ptb"} and saved["ptb"]["windows"] == 2


def test_eval_ppl_json(model_dir, data_dir, capsys):
    assert (
        main(
            [
                "eval",
                "ppl",
                str(model_dir),
                "--dataset",
                "wikitext2,ptb",
                "--seq-len",
                "16",
                "--max-windows",
                "3",
                "--data-dir",
                str(data_dir),
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    for name in ("wikitext2", "ptb"):
        result = data["results"][name]
        assert result["windows"] == 3 and result["protocol"]["seq_len"] == 16
        assert torch.isfinite(torch.tensor(result["ppl"]))
