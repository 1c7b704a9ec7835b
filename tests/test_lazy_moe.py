"""Layer-by-layer loading of MoE checkpoints whose experts transformers converts on load.

Hub checkpoints of Mixtral, Qwen-MoE, OLMoE, DeepSeek and GLM-MoE store each expert's
projections apart; transformers 5 stacks them into fused ``experts.gate_up_proj`` /
``experts.down_proj`` tensors on load, and ``save_pretrained`` writes them back one by one (the
hub layout, asserted below). The lazy model must build every layer exactly as
``from_pretrained`` does, reading only that layer's tensors. The score equality of the
sequential and whole-model paths for these families is in test_sequential.py (parametrised
over every tiny family).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.adapters import adapter_for
from secateurs.cli import main
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.models import load_model
from secateurs.run import prune
from secateurs.session.lazy import LazyModel
from secateurs.shards import CheckpointReader
from tiny_models import TINY_CONFIGS, tiny_model, tokens

# MoE families whose checkpoints store experts one by one (stacked by transformers on load)
CONVERTED = (
    "deepseek_v2",
    "deepseek_v3",
    "flex_olmo",
    "glm4_moe",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
)
EAGER = "eager"


def both_modes(tmp_path, **options):
    """The same run from ``tmp_path / "source"`` in memory and layer by layer."""
    return [
        prune(tmp_path / "source", mode=mode, out=tmp_path / out, progress=False, **options)
        for mode, out in (("memory", "memory"), ("sequential", "layered"))
    ]


def _reference(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_layers_equal(lazy: LazyModel, reference) -> None:
    """Every lazily loaded layer's parameters and buffers are from_pretrained's, bit for bit,
    and go back to ``meta`` afterwards."""
    layers = adapter_for(reference).layers(reference)
    for index in range(len(lazy.layers)):
        with lazy.loaded(index) as layer:
            actual, expected = layer.state_dict(), layers[index].state_dict()
            assert actual.keys() == expected.keys()
            for name, value in expected.items():
                assert torch.equal(actual[name], value), (index, name)
        assert all(p.is_meta for p in lazy.layers[index].parameters())


@pytest.mark.parametrize("model_type", CONVERTED)
def test_lazy_layers_equal_from_pretrained(model_type, tmp_path):
    tiny_model(model_type).save_pretrained(tmp_path)
    names = CheckpointReader(tmp_path).names()
    assert any(".experts.0." in n for n in names)  # the hub layout: one tensor per expert
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    lazy = LazyModel(tmp_path, attn_implementation=EAGER)
    assert lazy.map.converted  # the converters are what builds the experts here
    _assert_layers_equal(lazy, _reference(tmp_path))


def test_a_layer_reads_only_its_own_tensors_from_shards(tmp_path, monkeypatch):
    """Sharded so that one layer's experts span several files; experts beyond 9 must be
    stacked in numeric order (10 after 9, not after 1)."""
    config = AutoConfig.for_model("mixtral", **{**TINY_CONFIGS["mixtral"], "num_local_experts": 12})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(set(CheckpointReader(tmp_path).files.values())) > config.num_hidden_layers
    lazy = LazyModel(tmp_path, attn_implementation=EAGER)
    read = []
    real = CheckpointReader.read
    monkeypatch.setattr(CheckpointReader, "read", lambda self, n: read.append(n) or real(self, n))
    with lazy.loaded(3):
        pass
    assert read and all(n.startswith("model.layers.3.") for n in read)
    assert len(read) == len({n for n in lazy.reader.names() if n.startswith("model.layers.3.")})
    _assert_layers_equal(lazy, _reference(tmp_path))


def test_a_checkpoint_in_the_fused_layout_loads_too(tmp_path):
    """A checkpoint saved with transformers' in-memory names (experts already stacked) maps one
    to one, as from_pretrained loads it."""
    model = tiny_model("qwen2_moe")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path)
    lazy = LazyModel(tmp_path, attn_implementation=EAGER)
    assert not lazy.map.converted
    _assert_layers_equal(lazy, _reference(tmp_path))


def test_an_incomplete_checkpoint_is_refused_before_loading(tmp_path):
    """A missing expert would leave a layer's stacked tensor short: refused up front."""
    tiny_model("mixtral").save_pretrained(tmp_path)
    reader = CheckpointReader(tmp_path)
    missing = "model.layers.2.block_sparse_moe.experts.5.w2.weight"
    state = {n: reader.read(n) for n in reader.names() if n != missing}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"layers.2.mlp.experts.down_proj cannot be built from 7"):
        LazyModel(tmp_path)


def test_a_quantized_checkpoint_is_refused_before_loading(tmp_path):
    """DeepSeek-V3 ships FP8 blocks with scales: read as floats they would be silently wrong."""
    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"quantized checkpoint \(fp8\)"):
        LazyModel(tmp_path)


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3"])
def test_sequential_depth_prune_of_moe_equals_in_memory(model_type, tmp_path):
    """Scored layer by layer from per-expert shards, streamed out: the in-memory result."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "source")
    calibration = tokens(8, 12)
    memory, layered = both_modes(tmp_path, criterion="block-influence", unit="block", remove=2,
                                 protect="none", calibration=calibration)  # fmt: skip
    assert layered.plan.blocks == memory.plan.blocks
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "layered" / name).read_bytes() == (
            tmp_path / "memory" / name
        ).read_bytes()
    saved = json.loads((tmp_path / "layered" / "secateurs.json").read_text())
    assert saved["session"]["name"] == "sequential"


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_streamed_head_pruning_of_moe_equals_in_memory(model_type, tmp_path):
    """Width surgery layer by layer writes the untouched experts back one by one, as
    save_pretrained does: the same checkpoint, byte for byte."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "source")
    calibration = tokens(16, 12)
    both_modes(tmp_path, criterion="activation", unit="heads", ratio=0.25,
               calibration=calibration)  # fmt: skip
    for name in ("model.safetensors", "config.json"):
        layered = (tmp_path / "layered" / name).read_bytes()
        assert layered == (tmp_path / "memory" / name).read_bytes()
    config = json.loads((tmp_path / "layered" / "config.json").read_text())
    assert config["num_key_value_heads"] == 1  # one of the two KV groups went


EXPERT_CASES = (
    ("mixtral", "reap", dict(remove=2)),  # uniform: the config's expert count changes
    ("deepseek_v3", "frequency", dict(params=30_000, allocation="global")),  # per-layer counts
    ("qwen2_moe", "magnitude", dict(remove=2)),  # data-free, shared expert kept
)


@pytest.mark.parametrize(("model_type", "criterion", "amount"), EXPERT_CASES)
def test_sequential_expert_pruning_equals_in_memory(model_type, criterion, amount, tmp_path):
    """Experts scored and cut layer by layer: the in-memory result, byte for byte, with the
    remaining experts renumbered one by one in the checkpoint."""
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path / "source")
    calibration = tokens(8, 12)
    memory, layered = both_modes(tmp_path, criterion=criterion, unit="experts",
                                 calibration=calibration, **amount)  # fmt: skip
    record = layered.record
    assert record["plan"] == memory.plan.to_dict()
    expected = memory.record["expert_scores"]
    assert record["expert_scores"].keys() == expected.keys()
    for layer, values in expected.items():
        assert record["expert_scores"][layer] == pytest.approx(values, rel=1e-5, abs=1e-9)
    assert memory.plan.has_experts
    for name in ("model.safetensors", "config.json"):
        layered = (tmp_path / "layered" / name).read_bytes()
        assert layered == (tmp_path / "memory" / name).read_bytes()
    saved, reference = (
        json.loads((tmp_path / out / "secateurs.json").read_text()) for out in ("layered", "memory")
    )
    assert (saved["structure"], saved["loading"]) == (reference["structure"], reference["loading"])
    assert saved.get("expert_usage") == reference.get("expert_usage")  # routing criteria only
    reloaded = load_model(tmp_path / "layered")[0].eval()
    ids = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, memory.model(ids).logits)


def test_cli_experts_too_large_for_memory_saves_what_the_in_memory_path_saves(
    tokenizer, calibration_file, tmp_path, capsys
):
    tiny_model("mixtral").save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")
    flags = ["--unit", "experts", "--criterion", "reap", "--remove", "2"]
    flags += ["--calibration", str(calibration_file), "--n-samples", "8", "--calib-seq-len", "16"]
    # the layered run is chosen by --max-memory: loading the model whole would need more
    for out, extra in (("memory", []), ("layered", ["--max-memory", "1e-6"])):
        command = ["prune", str(tmp_path / "source"), "--out", str(tmp_path / out), *extra]
        assert main([*command, *flags]) == 0
        printed = capsys.readouterr().out
        assert "kept experts per MoE layer [0, 1, 2, 3, 4, 5]: [6, 6, 6, 6, 6, 6]" in printed
    assert "reading it one layer at a time (--sequential)" in printed
    record = json.loads((tmp_path / "layered" / "secateurs.json").read_text())
    assert record["session"]["name"] == "sequential"
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        layered = (tmp_path / "layered" / name).read_bytes()
        assert layered == (tmp_path / "memory" / name).read_bytes()
