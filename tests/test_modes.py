"""Every unit kind and mix × every option that changes the result × every mode: the same model.

One flow serves all modes: in memory (``mode="memory"``), one layer at a time from disk
(``"sequential"``) and, for an explicit block plan, copied tensor by tensor (``"stream"``). For
each case below the checkpoints saved in every mode hold the same tensors (within 1e-6; in
practice bit for bit), the same config and the same record but for the timings and the mode;
an option a mode cannot do is refused before any work, naming the option.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.errors import ConfigError
from secateurs.run import prune
from tiny_models import TINY_CONFIGS, tiny_model, tiny_tokenizer, tokens

CALIBRATION = tokens(16, 12, seed=4)

# (family, the case's options): every unit kind and mix, every option that changes the result
CASES = {
    "block, SL protection": ("llama8", dict(unit="block", criterion="block-influence+", remove=1)),
    "block, --protect": (
        "qwen2",
        dict(unit="block", criterion="magnitude", remove=2, protect="0,-1"),
    ),
    "block, ppl one-shot": ("gpt2", dict(unit="block", criterion="ppl", remove=2, protect="none")),
    "block, ppl --iterative (search)": (
        "llama",
        dict(unit="block", criterion="ppl", remove=2, iterative=True, protect="none"),
    ),
    "block, --iterative re-scoring": (
        "qwen2",
        dict(unit="block", criterion="block-influence", remove=2, iterative=True, protect="none"),
    ),
    "block, --heal": (
        "llama",
        dict(unit="block", criterion="ppl", remove=2, protect="none", heal=True, heal_bias=True),
    ),
    "block, --heal dense": (
        "qwen2",
        dict(
            unit="block",
            criterion="magnitude",
            remove=2,
            protect="0",
            heal=True,
            heal_target="dense",
        ),
    ),  # fmt: skip
    "attn, --heal": (
        "llama",
        dict(unit="attn", criterion="block-influence", remove=2, protect="none", heal=True),
    ),
    "block, --heal cosine": (
        "qwen2",
        dict(
            unit="block",
            criterion="magnitude",
            remove=2,
            protect="0",
            heal=True,
            heal_objective="cosine",
        ),
    ),  # fmt: skip
    "mlp, --heal": (
        "gpt2",
        dict(unit="mlp", criterion="ppl", remove=2, protect="none", heal=True),
    ),
    "subblock": ("llama", dict(unit="subblock", criterion="ppl", remove=1, protect="none")),
    "width, uniform, reconstruction": (
        "llama",
        dict(unit="width", criterion="fluctuation", ratio=0.3),
    ),  # fmt: skip
    "width, global with sensitivity": (
        "gpt2",
        dict(unit="width", criterion="activation", ratio=0.3, allocation="global"),
    ),  # fmt: skip
    "width, global without sensitivity": (
        "qwen2",
        dict(
            unit="channels",
            criterion="activation",
            ratio=0.2,
            allocation="global",
            sensitivity=False,
        ),
    ),  # fmt: skip
    "width, compensation": (
        "opt",
        dict(unit="width", criterion="fluctuation", ratio=0.3, reconstruct=False),
    ),  # fmt: skip
    "width, mini-llm": ("llama", dict(unit="heads", criterion="mini-llm", ratio=0.2)),
    "experts, uniform": ("mixtral", dict(unit="experts", criterion="reap", remove=2)),
    "experts, global": (
        "qwen2_moe",
        dict(unit="experts", criterion="frequency", params=40_000, allocation="global"),
    ),
    "block,width, --heal": (
        "llama",
        dict(
            unit="block,width",
            criterion="block-influence,activation",
            ratio=0.4,
            depth_share=0.5,
            protect="none",
            heal=True,
        ),
    ),
}
MODES = ("memory", "sequential")
VOLATILE = {"created", "timings", "session", "versions", "argv"}


def _model(family):
    if family != "llama8":
        return tiny_model(family)
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "num_hidden_layers": 8})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()  # 8 layers: SL protects 6


def _source(tmp_path, family):
    path = tmp_path / family
    if not path.is_dir():
        _model(family).save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
    return path


def _tensors(directory) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        found.update(load_file(path))
    return found


def _record(directory) -> dict:
    record = json.loads((directory / "secateurs.json").read_text())
    record["spec"].pop("mode", None)
    for flag in ("--in-memory", "--sequential", "--stream"):
        record["command"] = record["command"].replace(f" {flag}", "")
    return _untimed({k: v for k, v in record.items() if k not in VOLATILE})


def _untimed(value):
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if k != "seconds" and not k.endswith("_s")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def assert_same_record(a, b, where="record") -> None:
    """Equal, floats to 1e-6 relative (scores read from the head in one piece or in row blocks
    differ in the last bits, and a sensitivity subtracts two close losses)."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_record(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_record(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) or a == b, (where, a, b)
    else:
        assert a == b, (where, a, b)


def assert_same_checkpoint(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        torch.testing.assert_close(ta[name], tb[name], rtol=0, atol=1e-6, msg=name)
    assert json.loads((a / "config.json").read_text()) == json.loads(
        (b / "config.json").read_text()
    )
    assert_same_record(_record(a), _record(b))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_saves_the_same_checkpoint(case, tmp_path):
    family, options = CASES[case]
    source = _source(tmp_path, family)
    outs = {}
    for mode in MODES:
        outs[mode] = tmp_path / mode
        result = prune(source, mode=mode, calibration=CALIBRATION, out=outs[mode],
                       progress=False, **options)  # fmt: skip
        assert result.record["session"]["name"] == mode
    assert_same_checkpoint(outs["memory"], outs["sequential"])
    assert not result.plan.is_empty


def test_the_dual_form_of_reconstruction_is_the_same_in_every_mode(tmp_path, monkeypatch):
    """The fit's form depends on shapes and token count only, never on the mode."""
    monkeypatch.setattr("secateurs.fit.reconstruct.FLOAT64_BYTES", 0)
    source, outs = _source(tmp_path, "llama"), {}
    for mode in MODES:
        outs[mode] = tmp_path / mode
        prune(source, mode=mode, calibration=CALIBRATION[:4], out=outs[mode], progress=False,
              unit="width", criterion="activation", ratio=0.3)  # fmt: skip
    assert_same_checkpoint(outs["memory"], outs["sequential"])
    forms = {row["form"] for row in _record(outs["sequential"])["reconstruction"]["layers"]}
    assert "dual (tokens < kept columns)" in forms  # MLPs; o_proj keeps fewer columns


STORED_LINEARS = {  # width runs whose lazy session may hold 16-bit Linear weights as stored
    "activation, reconstruction": dict(criterion="activation", ratio=0.3),
    "fluctuation, compensation": dict(criterion="fluctuation", ratio=0.3, reconstruct=False),
    "magnitude, global": dict(criterion="magnitude", ratio=0.3, allocation="global"),
}


@pytest.mark.parametrize("case", sorted(STORED_LINEARS))
def test_16_bit_weights_held_as_stored_give_the_float32_model(case, tmp_path):
    """Layer by layer from a bfloat16 checkpoint, computing in float32, the Linear weights stay
    in bfloat16 (half the memory) and are widened inside each matmul: the saved model is the
    in-memory float32 run's, bit for bit."""
    source = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    outs = {}
    for mode in MODES:
        outs[mode] = tmp_path / mode
        prune(source, mode=mode, dtype="float32", calibration=CALIBRATION, out=outs[mode],
              progress=False, unit="width", **STORED_LINEARS[case])  # fmt: skip
    assert_same_checkpoint(outs["memory"], outs["sequential"])
    record = json.loads((outs["sequential"] / "secateurs.json").read_text())
    assert record["session"]["linear_weights_held"] == "as stored"
    assert {t.dtype for t in _tensors(outs["sequential"]).values()} == {torch.bfloat16}


def test_weights_are_held_in_the_compute_dtype_where_a_run_differentiates_or_edits_them(
    tmp_path,
):
    source = tmp_path / "bf16"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    for name, options in {
        "no stored-weight reader": dict(unit="width", criterion="submodel", ratio=0.3),
        "healing": dict(unit="block", criterion="block-influence", remove=1, heal=True),
    }.items():
        out = tmp_path / name
        prune(source, mode="sequential", dtype="float32", calibration=CALIBRATION, out=out,
              progress=False, protect="none", **options)  # fmt: skip
        record = json.loads((out / "secateurs.json").read_text())
        assert record["session"]["linear_weights_held"] == "compute dtype", name


REPLAYED = ("width, uniform, reconstruction", "experts, uniform", "block,width, --heal",
            "block, --heal")  # fmt: skip


@pytest.mark.parametrize("case", REPLAYED)
def test_plan_replays_every_kind_in_every_mode(case, tmp_path):
    """``--plan`` with another run's secateurs.json cuts the same units in every mode; with the
    same repairs and windows it is the same model."""
    family, options = CASES[case]
    source = _source(tmp_path, family)
    first = prune(source, calibration=CALIBRATION, out=tmp_path / "first", progress=False,
                  **options)  # fmt: skip
    fits = {k: v for k, v in options.items() if k.startswith("heal")}
    for mode in MODES:
        again = prune(
            source,
            plan=str(tmp_path / "first" / "secateurs.json"),
            mode=mode,
            calibration=CALIBRATION,
            out=tmp_path / mode,
            progress=False,
            **fits,
        )
        assert again.plan == first.plan  # fmt: skip
        assert _tensors(tmp_path / mode).keys() == _tensors(tmp_path / "first").keys()
        for name, value in _tensors(tmp_path / mode).items():
            torch.testing.assert_close(value, _tensors(tmp_path / "first")[name], rtol=0, atol=1e-6)


def test_an_explicit_block_plan_is_the_same_in_all_three_modes(tmp_path):
    source = _source(tmp_path, "qwen2_moe")  # experts stored one by one, converted on load
    for mode in ("memory", "sequential", "stream"):
        result = prune(source, blocks="1,4", mode=mode, out=tmp_path / mode, progress=False)
        assert result.record["session"]["name"] == mode
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "sequential")
    assert_same_checkpoint(tmp_path / "memory", tmp_path / "stream")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(unit="block", criterion="taylor", remove=1, mode="sequential"), "backward pass"),
        (dict(unit="width", criterion="influence", ratio=0.2, mode="sequential"), "backward"),
        (dict(unit="block", criterion="magnitude", remove=1, mode="stream"), "--stream copies"),
        (dict(blocks="1", heal=True, mode="stream"), "no --heal"),
    ],
)
def test_what_a_mode_cannot_do_is_refused_before_any_work(options, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        prune(tmp_path / "never-read", out=tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_the_switch_to_layer_by_layer_is_announced_and_recorded(tmp_path, capsys):
    source = _source(tmp_path, "llama")
    result = prune(source, unit="block", criterion="magnitude", remove=1, max_memory=1e-9,
                   out=tmp_path / "out", progress=False)  # fmt: skip
    assert "reading it one layer at a time" in capsys.readouterr().out
    assert result.record["session"]["name"] == "sequential"
    assert "switched" in result.record["session"]


def test_a_layer_by_layer_write_counts_the_spill_it_frees_as_it_goes(tmp_path, monkeypatch):
    """Each spilled layer is deleted once copied, so the free space asked for is the output
    less all but the largest spilled layer (at 14B, 22 GB less); none is left after."""
    import secateurs.writer as writer

    asked, spills = [], {}
    original = writer.atomic_directory

    def watched(out, overwrite=False, needed=0, **kwargs):
        asked.append(needed)
        source_files = set((tmp_path / "llama").glob("*.safetensors"))
        spills.update({p: p.stat().st_size for p in tmp_path.rglob("*.safetensors")
                       if p not in source_files})  # fmt: skip
        return original(out, overwrite=overwrite, needed=needed, **kwargs)

    monkeypatch.setattr(writer, "atomic_directory", watched)
    source = _source(tmp_path, "llama")
    prune(source, mode="sequential", calibration=CALIBRATION, out=tmp_path / "out",
          progress=False, unit="width", criterion="activation", ratio=0.3)  # fmt: skip
    output = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    credit = sum(spills.values()) - max(spills.values())
    assert len(spills) > 1 and not any(p.exists() for p in spills)
    assert asked == [pytest.approx(output + (20 << 20) - credit, abs=64 << 10)]
