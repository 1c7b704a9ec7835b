"""The Python examples of README.md and docs/*.md, run on tiny random models.

Each test is one documented snippet with the sizes shrunk (a 6-layer tiny LLaMA or Mixtral,
a small calibration file); what it asserts is what the snippet promises. If a doc's example
changes, change its test here in the same commit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs import PPLProtocol, load_model, perplexity, prune
from secateurs.errors import ConfigError
from secateurs.plan import Plan
from secateurs.units import apply_plan
from tiny_models import LAYERS, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# Small calibration for every example: 4 windows of 16 tokens from the fixture's text file.
SMALL = dict(n_samples=4, calib_seq_len=16, progress=False)


def small(calibration_file: Path, **options) -> dict:
    return {**SMALL, "calibration": str(calibration_file), **options}


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def record_of(out: Path) -> dict:
    return json.loads((out / "secateurs.json").read_text())


# --- README.md "Use" and docs/depth.md ---------------------------------------------------------
def test_readme_snippet_prunes_blocks_saves_and_measures(
    tmp_path, calibration_file, data_dir, monkeypatch
):
    """README: load, prune 6 blocks by ppl+, perplexity of the result (here: 2 of 6 tiny
    blocks by ppl with the first and last protected, since ppl+ protects all six)."""
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(data_dir))
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path / "d2"
    result = prune(
        model,
        tokenizer=tokenizer,
        unit="block",
        criterion="ppl+",
        protect="0,-1",
        remove=2,
        out=out,
        **small(calibration_file),
    )
    ppl = perplexity(result.model, tokenizer, PPLProtocol("wikitext2", max_windows=4)).ppl
    assert len(result.plan.blocks) == 2 and not {0, LAYERS - 1} & set(result.plan.blocks)
    assert result.model is model and len(model.model.layers) == LAYERS - 2
    assert AutoConfig.from_pretrained(out).num_hidden_layers == LAYERS - 2
    assert record_of(out)["plan"]["blocks"] == list(result.plan.blocks)
    assert result.out == out and torch.isfinite(torch.tensor(ppl)) and ppl > 1


def test_depth_snippet_records_the_removed_parameters(tmp_path, calibration_file):
    """docs/depth.md: ``result.plan.blocks`` and ``result.record["parameters"]``."""
    model = tiny_model("llama")
    block = sum(p.numel() for p in model.model.layers[0].parameters())
    result = prune(
        model,
        tokenizer=tiny_tokenizer(),
        unit="block",
        criterion="block-influence",
        remove=2,
        out=tmp_path / "d2",
        **small(calibration_file),
    )
    params = result.record["parameters"]
    assert params["asked_remove"] == 2 and params["before"] - params["after"] == 2 * block
    assert result.record["units"] == ["depth"] and result.record["session"]["name"] == "memory"


def test_readme_snippet_as_written_uses_current_names():
    """The README's snippet, exactly, imports and calls the current API (keyword tokenizer)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert "from secateurs import PPLProtocol, load_model, perplexity, prune" in code
    assert "prune(model, tokenizer=tokenizer," in code
    compile(code, "README.md", "exec")


# --- docs/width.md -------------------------------------------------------------------------------
def test_width_snippet_allocates_globally_within_layers(tmp_path, calibration_file):
    """docs/width.md: width by activation, global allocation over --layers, rounded widths,
    reconstruction on; the checkpoint reloads with ``secateurs.load_model``."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    out = tmp_path / "w20"
    result = prune(
        model,
        tokenizer=tokenizer,
        unit="width",
        criterion="activation",
        ratio=0.2,
        allocation="global",
        layers="1:5",
        min_ratio=0.0,
        max_ratio=0.9,
        round_to=8,
        uniform_widths=False,
        include_embeddings=False,
        reconstruct=None,
        reconstruct_damping=0.01,
        reconstruct_samples=8,
        out=out,
        **small(calibration_file),
    )
    plan, record = result.plan, record_of(out)
    assert plan.channels[0] == () and plan.channels[LAYERS - 1] == ()  # outside --layers
    kept = [64 - len(gone) for gone in plan.channels]
    assert all(k % 8 == 0 for k in kept) and min(kept) < 64
    assert record["reconstruction"]["enabled"] is True
    assert abs(record["parameters"]["achieved_ratio"] - 0.2) < 0.05  # widths rounded to 8
    reloaded, _ = load_model(out)
    widths = [layer.mlp.down_proj.in_features for layer in reloaded.model.layers]
    assert widths == kept == record["structure"]["widths"]["channels"]


# --- docs/criteria.md ----------------------------------------------------------------------------
def test_criteria_activation_snippet_is_the_source():
    """docs/criteria.md shows ``activation.py``'s class: every line of it is in the source."""
    doc = (ROOT / "docs" / "criteria.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    source = (ROOT / "src" / "secateurs" / "criteria" / "activation.py").read_text()
    lines = [line for line in snippet.splitlines() if line.strip()]
    assert len(lines) > 10 and [line for line in lines if line not in source] == []


def test_criteria_options_go_through_options(tmp_path, calibration_file):
    """docs/criteria.md: a seed-paper criterion with its options (``--option KEY=VALUE``,
    ``options={...}`` in Python); an unknown option is refused before any work."""
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    result = prune(
        model,
        tokenizer=tokenizer,
        unit="width",
        criterion="mini-llm",
        ratio=0.2,
        options={"scope": "model", "antithetic": True},
        reconstruct=False,
        **small(calibration_file),
    )
    options = result.record["criterion"]["options"]  # resolved: the given ones and defaults
    assert options["scope"] == "model" and options["antithetic"] is True
    assert options["layers_per_pass"] == 3
    assert result.out is None and result.plan.has_widths
    with pytest.raises(ConfigError, match="has no option scop;.*did you mean 'scope'"):
        prune(tiny_model("llama"), tokenizer=tokenizer, unit="width", criterion="mini-llm",
              ratio=0.2, options={"scop": "model"})  # fmt: skip


# --- docs/scale.md -------------------------------------------------------------------------------
def test_scale_sequential_width_writes_the_in_memory_checkpoint(
    tmp_path, model_dir, calibration_file
):
    """docs/scale.md: ``prune(path, unit="width", ..., sequential=True, out=...)`` reads one
    layer at a time and writes what the in-memory run writes."""
    options = small(calibration_file, unit="width", criterion="activation", ratio=0.2)
    options["reconstruct_samples"] = 8
    lazy = prune(str(model_dir), sequential=True, out=tmp_path / "seq", **options)
    whole = prune(str(model_dir), in_memory=True, out=tmp_path / "mem", **options)
    assert lazy.model is None and lazy.record["session"]["name"] == "sequential"
    assert whole.record["session"]["name"] == "memory" and lazy.plan == whole.plan
    a, b = saved_tensors(tmp_path / "seq"), saved_tensors(tmp_path / "mem")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_scale_sequential_experts(tmp_path, calibration_file):
    """docs/scale.md: experts removed layer by layer (``unit="experts"``, ``criterion="reap"``)."""
    source = tmp_path / "moe"
    tiny_model("mixtral").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    before = AutoConfig.from_pretrained(source).num_local_experts
    out = tmp_path / "e"
    result = prune(str(source), unit="experts", criterion="reap", remove=1, sequential=True,
                   out=out, **small(calibration_file))  # fmt: skip
    record = record_of(out)
    assert record["units"] == ["experts"] and record["session"]["name"] == "sequential"
    assert all(len(gone) == 1 for gone in result.plan.experts)
    assert AutoConfig.from_pretrained(out).num_local_experts == before - 1
    assert AutoModelForCausalLM.from_pretrained(out).config.num_local_experts == before - 1


def test_scale_stream_copies_the_kept_blocks(tmp_path, model_dir):
    """docs/scale.md: ``prune(path, blocks="1,2", stream=True, out=...)`` never loads the model
    and writes, byte for byte, what the in-memory cut writes."""
    streamed = prune(str(model_dir), blocks="1,2", stream=True, out=tmp_path / "s", progress=False)
    loaded = prune(str(model_dir), blocks="1,2", in_memory=True, out=tmp_path / "m", progress=False)
    assert streamed.record["session"]["name"] == "stream" and streamed.model is None
    a, b = saved_tensors(tmp_path / "s"), saved_tensors(tmp_path / "m")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert AutoConfig.from_pretrained(tmp_path / "s").num_hidden_layers == LAYERS - 2
    assert loaded.plan.blocks == (1, 2)


# --- docs/plans.md ------------------------------------------------------------------------------
# The keys every secateurs.json has, as docs/plans.md's table lists them.
RECORD_KEYS = {
    "secateurs_version", "created", "source_model", "model_type", "versions", "units", "plan",
    "criterion", "calibration", "parameters", "timings", "spec", "command", "argv", "session",
    "scores", "reconstruction", "healing", "structure", "loading", "engines",
}  # fmt: skip


def test_plans_record_keys_and_replay(tmp_path, model_dir, calibration_file):
    """docs/plans.md: every record has the documented keys; ``Plan.of_record`` reads its plan;
    ``apply_plan`` of it on the original model gives the saved model; ``--plan`` replays it."""
    out = tmp_path / "d"
    options = small(calibration_file, unit="block", criterion="block-influence", remove=2)
    result = prune(str(model_dir), out=out, **options)
    record = record_of(out)
    assert set(record) == RECORD_KEYS
    timings = ["load_s", "scoring_s", "cut_s", "write_s", "cpu_s", "peak_rss_mb"]
    assert list(record["timings"]) == timings  # the table's phases, in its order
    assert record["command"].startswith(f"secateurs prune {model_dir} --unit block")
    plan = Plan.of_record(record)
    assert plan == result.plan and plan.parts == ("depth",)
    replayed = apply_plan(AutoModelForCausalLM.from_pretrained(model_dir), plan)
    saved = saved_tensors(out)
    assert all(torch.equal(v, saved[k]) for k, v in replayed.state_dict().items() if k in saved)
    again = prune(str(model_dir), plan=str(out / "secateurs.json"), out=tmp_path / "again",
                  progress=False)  # fmt: skip
    assert again.plan == plan and saved_tensors(tmp_path / "again").keys() == saved.keys()


def test_plans_combined_budget(tmp_path, model_dir, calibration_file):
    """docs/plans.md: ``--unit block,width`` under one ratio, blocks then width, one plan."""
    options = small(calibration_file, unit="block,width", criterion="block-influence,activation")
    result = prune(str(model_dir), ratio=0.45, depth_share=0.5, reconstruct_samples=8, **options)
    params = result.record["parameters"]
    assert result.plan.parts == ("depth", "width") and len(result.plan.blocks) >= 1
    assert params["depth_share"] == 0.5 and params["removed_by_depth"] > 0
    assert (
        params["removed_by_width"]
        == params["before"] - params["after"] - params["removed_by_depth"]
        > 0
    )


# --- the `secateurs prune` command lines of the docs -------------------------------------------
DOCS = ("scale", "width", "criteria", "depth", "architectures", "reliability", "plans")


def prune_commands() -> list[tuple[str, str]]:
    """Every ``secateurs prune`` line of the docs' bash blocks (continuations joined)."""
    found = []
    for path in [ROOT / "README.md", *(ROOT / "docs" / f"{name}.md" for name in DOCS)]:
        for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split("#")[0].strip()
                if line.startswith("secateurs prune") and "..." not in line:
                    found.append((path.name, line))
    return found


@pytest.mark.parametrize(("doc", "line"), prune_commands())
def test_doc_prune_commands_are_valid_specs(doc, line):
    """Each documented ``secateurs prune`` command parses, and its flags make a valid spec
    (every flag exists; no combination the spec refuses), without a model."""
    import shlex

    from secateurs.cli import apply_recipe, build_parser
    from secateurs.commands.spec_args import spec_from_args

    parser, leaves = build_parser(("prune",))
    words = shlex.split(line)[1:]
    args = parser.parse_args(words)
    if args.config is not None:  # a recipe of the repository: its keys are defaults
        apply_recipe(leaves[("prune",)], ROOT / args.config)
        args = parser.parse_args(words)
    spec = spec_from_args(args)
    assert spec.units and (spec.budget.given or spec.selection.explicit)


def test_doc_prune_commands_are_found():
    assert len(prune_commands()) >= 15
