"""Streaming (``mode="stream"``: an explicit plan cut from the checkpoint with no model in
memory and nothing computed) writes exactly what ``save_pretrained`` saves, tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from secateurs.checkpoint import read_record
from secateurs.errors import ConfigError, ModelFileError
from secateurs.plan import Plan
from secateurs.run import prune
from secateurs.shards import (
    CheckpointReader,
    TensorSpec,
    row_blocks,
    stored_tensors,
    write_safetensors,
)
from secateurs.units import apply_plan
from tiny_models import TINY_CONFIGS, tiny_model, tiny_tokenizer, tokens

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool]


def test_writer_is_byte_identical_to_safetensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(DTYPES * 2):
        values = torch.randn(3, i + 1, generator=generator) * 50
        tensors[f"t{(7 * i) % 12}.w"] = values.to(dtype)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, tmp_path / "library.safetensors", metadata={"format": "pt"})
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", specs, tensors.__getitem__, {"format": "pt"})
    library = (tmp_path / "library.safetensors").read_bytes()
    assert (tmp_path / "ours.safetensors").read_bytes() == library


def test_plain_reads_equal_safetensors_own_loader(tmp_path):
    """Tensors, row ranges and row blocks read without a memory map are bit for bit the
    library's, for every dtype, 0-d, 1-d and empty tensors, in one file or an indexed set."""
    generator = torch.Generator().manual_seed(1)
    tensors = {
        f"w{i}": (torch.randn(7, 5, generator=generator) * 9).to(d) for i, d in enumerate(DTYPES)
    }
    tensors |= {
        "scalar": torch.tensor(2.5),
        "vector": torch.arange(6.0),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    stored = stored_tensors(tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path)
    assert reader.names() == set(tensors) == set(stored)
    for name, expected in tensors.items():
        assert (
            torch.equal(reader.read(name), expected) and reader.read(name).dtype == expected.dtype
        )
        assert reader.meta(name).shape == expected.shape and reader.meta(name).is_meta
        blocks = list(row_blocks(stored[name], max_bytes=11))  # a row or two at a time
        if expected.dim() >= 2 and len(expected):
            assert torch.equal(torch.cat(blocks), expected)
            assert torch.equal(stored[name].read(2, 5), expected[2:5])
    index = torch.tensor([0, 3, 6])
    assert torch.equal(reader.rows("w0", index), tensors["w0"][index])


def stream_depth_prune(source, plan, out, **options):
    return prune(source, plan=plan.to_dict(), mode="stream", out=out, progress=False, **options)


def _in_memory(source, plan, out, **save):
    model = AutoModelForCausalLM.from_pretrained(source)
    apply_plan(model, plan)
    model.save_pretrained(out, **save)
    return model


def _weights(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.glob("model*.safetensors*"))}


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_streamed_blocks_equal_in_memory_surgery(model_type, tmp_path):
    source = tmp_path / "source"
    tiny_model(model_type).save_pretrained(source)
    plan = Plan(num_layers=6, blocks=(1, 4))
    expected = _in_memory(source, plan, tmp_path / "memory")
    stream_depth_prune(source, plan, tmp_path / "stream")
    assert _weights(tmp_path / "stream") == _weights(tmp_path / "memory")
    config = json.loads((tmp_path / "stream" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected.eval()(ids).logits)


def test_sharded_input_and_output_match_save_pretrained(tmp_path, monkeypatch):
    monkeypatch.setattr("secateurs.shards.CHUNK_BYTES", 100)  # copy a few rows at a time
    source = tmp_path / "source"
    model = tiny_model("llama")
    model.save_pretrained(source, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(source)
    assert (source / "model.safetensors.index.json").is_file()
    plan = Plan(num_layers=6, blocks=(0, 2, 3))
    _in_memory(source, plan, tmp_path / "memory", max_shard_size="20KB")
    monkeypatch.setattr("secateurs.shards.DEFAULT_SHARD", "20KB")
    stream_depth_prune(source, plan, tmp_path / "stream")
    weights = _weights(tmp_path / "stream")
    assert len(weights) > 2 and weights == _weights(tmp_path / "memory")
    record = read_record(tmp_path / "stream")
    assert record["plan"]["blocks"] == [0, 2, 3] and record["loading"]["plain_transformers"]
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def test_branch_and_width_plans_stream_as_they_cut_in_memory(tmp_path):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    widths = ((1,),) + ((),) * 5
    plan = Plan(6, attn=(2,), heads=widths, channels=((),) * 6, num_heads=(2,) * 6,
                num_channels=(64,) * 6)  # fmt: skip
    stream_depth_prune(source, plan, tmp_path / "stream", reconstruct=False)
    memory = prune(source, plan=plan.to_dict(), mode="memory", reconstruct=False,
                   out=tmp_path / "memory", progress=False)  # fmt: skip
    assert memory.record["session"]["name"] == "memory"
    assert _weights(tmp_path / "stream") == _weights(tmp_path / "memory")
    assert read_record(tmp_path / "stream")["structure"] == memory.record["structure"]


def test_non_safetensors_input_is_refused(tmp_path):
    tiny_model("llama").config.save_pretrained(tmp_path / "bare")
    with pytest.raises(ModelFileError, match="no weights.*safetensors"):
        stream_depth_prune(tmp_path / "bare", Plan(num_layers=6, blocks=(1,)), tmp_path / "o")


def test_structured_sources_are_refused_before_writing(tmp_path):
    """A checkpoint with removed branches cannot be rebuilt from its config: refuse it."""
    from secateurs.writer import save_checkpoint

    model = tiny_model("llama")
    apply_plan(model, Plan(num_layers=6, mlp=(3,)))
    save_checkpoint(model, None, tmp_path / "branches", {})
    with pytest.raises(ConfigError, match="skipped_branches"):
        stream_depth_prune(tmp_path / "branches", Plan(num_layers=6, blocks=(1,)), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_stream_records_the_engines_of_a_plain_checkpoint(tmp_path):
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    stream_depth_prune(source, Plan(num_layers=6, blocks=(2,)), tmp_path / "stream")
    engines = read_record(tmp_path / "stream")["engines"]
    assert engines["hf"]["expressible"] and "vLLM" in engines["hf"]["engines"]


def test_cli_stream_equals_in_memory_explicit_prune(tmp_path, capsys):
    """`prune --stream` writes what `prune --blocks` saves, and records the same plan."""
    from secateurs.cli import main

    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    memory, stream = tmp_path / "memory", tmp_path / "stream"
    assert main(["prune", str(source), "--blocks", "1,4", "--out", str(memory)]) == 0
    assert main(["prune", str(source), "--blocks", "1,4", "--stream", "--out", str(stream)]) == 0
    assert "(read stream)" in capsys.readouterr().out
    assert _weights(stream) == _weights(memory)
    config = json.loads((stream / "config.json").read_text())
    assert config == json.loads((memory / "config.json").read_text())
    streamed, saved = read_record(stream), read_record(memory)
    for key in ("plan", "parameters", "loading", "engines", "structure"):
        assert streamed[key] == saved[key], key
    assert streamed["session"]["name"] == "stream"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--remove", "2"], "--stream copies an explicit block plan"),
        (["--blocks", "1", "--heal"], "no --heal"),
        (["--blocks", "1", "--params", "100"], "takes no --ratio, --remove or --params"),
    ],
)
def test_cli_stream_refuses_what_it_cannot_do(tmp_path, capsys, flags, message):
    from secateurs.cli import main

    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    assert main(["prune", str(source), "--stream", *flags, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_explicit_cut_needs_no_data_but_healing_does(tmp_path, monkeypatch, capsys):
    """`--blocks` alone reads no calibration: it runs with no data directory; `--heal` fits on
    C4 and says so before the model is loaded."""
    from secateurs.cli import main

    monkeypatch.delenv("SECATEURS_DATA_DIR", raising=False)
    monkeypatch.setattr("secateurs.data.hub_reachable", lambda: False)
    source = tmp_path / "source"
    tiny_model("llama").save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    assert main(["prune", str(source), "--blocks", "1,4", "--out", str(tmp_path / "a")]) == 0
    healed = ["prune", str(source), "--blocks", "1,4", "--heal", "--out", str(tmp_path / "b")]
    assert main(healed) == 2
    assert "C4 calibration needs data" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_glibc_serves_large_blocks_by_mapping_before_the_lazy_skeleton_is_built(
    tmp_path, monkeypatch
):
    """Building the skeleton allocates each parameter whole before moving it to ``meta``. Under
    glibc's default (a threshold that rises to the largest block freed) those blocks can come
    from the heap: at 14B the heap then held ~1.9 GB, which later tensors were carved from (peak
    RSS 2.17 GB instead of 1.55 GB in half the runs; docs/scale.md). So the fixed threshold must
    be set first."""
    import secateurs.sources as sources
    from secateurs.session import lazy

    order: list[str] = []
    monkeypatch.setattr(sources, "map_large_blocks", lambda: order.append("threshold"))
    build = lazy.LazyModel.__init__

    def init(self, *args, **kwargs):
        order.append("skeleton")
        build(self, *args, **kwargs)

    monkeypatch.setattr(lazy.LazyModel, "__init__", init)
    source = tmp_path / "llama"
    tiny_model("llama").save_pretrained(source)
    prune(source, blocks="1", sequential=True, out=tmp_path / "out", progress=False)
    assert order[:2] == ["threshold", "skeleton"]
