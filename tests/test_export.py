"""Engine exports: each format describes exactly the pruned shapes, reloads to the same logits,
and refuses (before loading weights) what it cannot express."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from secateurs.allocate import Bounds, UnitTable, allocate
from secateurs.checkpoint import read_record
from secateurs.cli import main
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.export import EXPORTS, check_export, export
from secateurs.export.decilm import exact_ffn_mult, ffn_mult_to_intermediate_size
from secateurs.export.gguf_file import ZERO_FFN, rope_permute
from secateurs.export.layout import read_layout
from secateurs.models import load_model
from secateurs.plan import Plan
from secateurs.structure import engines_for_model
from secateurs.targets import width_constraints
from secateurs.units import apply_plan
from secateurs.units.width import prune_layer
from secateurs.writer import save_checkpoint
from tiny_models import tiny_model, tokens

LLAMACPP_ENV = "SECATEURS_LLAMACPP"


def bpe_tokenizer():
    """A byte-level BPE tokenizer over the tiny vocabulary (what GGUF's gpt2 model needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:124]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    merge = (alphabet[0], alphabet[1])  # llama.cpp insists on a merges list
    vocab["".join(merge)] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[merge], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def widths_model(per_layer_kv: bool) -> torch.nn.Module:
    """Tiny LLaMA with per-layer MLP widths, one attention and one MLP branch removed, and
    KV groups either removed alike (layer-uniform query heads) or per layer."""
    from secateurs.adapters import adapter_for

    model = tiny_model("llama")
    adapter = adapter_for(model)
    for layer, channels in enumerate((0, 8, 16, 24, 0, 40)):
        if channels:
            prune_layer(model, adapter, layer, "channels", range(channels))
    kv_layers = (1, 3) if per_layer_kv else range(6)
    for layer in kv_layers:
        prune_layer(model, adapter, layer, "heads", [0])
    return apply_plan(model, Plan(num_layers=6, attn=(2,), mlp=(4,)))


def saved(model, path: Path, tokenizer=None) -> Path:
    save_checkpoint(model, tokenizer, path, {})
    return path


@pytest.fixture
def uniform_heads_dir(tmp_path):
    return saved(widths_model(per_layer_kv=False), tmp_path / "pruned", bpe_tokenizer())


# --- decilm ------------------------------------------------------------------------------------
def test_ffn_mult_maps_back_exactly_where_one_exists():
    assert exact_ffn_mult(1536, 576) == 4.0
    for hidden in (576, 2048, 4096, 8192):
        for width in range(256, 4 * hidden, 256):
            mult = exact_ffn_mult(width, hidden)
            assert mult is None or ffn_mult_to_intermediate_size(mult, hidden) == width
    assert exact_ffn_mult(1000, 576) is None  # not a multiple of 256: no multiplier gives it
    assert exact_ffn_mult(1536, 576) is not None


def test_decilm_config_describes_exactly_the_pruned_shapes(uniform_heads_dir, tmp_path):
    out = export(uniform_heads_dir, "decilm", tmp_path / "decilm")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    assert set(config["auto_map"].values()) == {
        "configuration_decilm.DeciLMConfig",
        "modeling_decilm.DeciLMForCausalLM",
    }
    assert config["num_attention_heads"] == 2  # one of two KV groups (2 query heads each) left
    blocks = config["block_configs"]
    assert blocks[2]["attention"] == {
        "no_op": True,
        "replace_with_linear": False,
        "n_heads_in_group": None,
    }
    assert blocks[4]["ffn"] == {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
    assert [b["attention"]["n_heads_in_group"] for b in blocks] == [2, 2, None, 2, 2, 2]
    assert [b["ffn"].get("intermediate_size") for b in blocks] == [64, 56, 48, 40, None, 24]
    assert not any("ffn_mult" in b["ffn"] for b in blocks if not b["ffn"]["no_op"])
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.3.mlp.down_proj.weight").get_shape() == [32, 40]
        assert f.get_slice("model.layers.1.self_attn.k_proj.weight").get_shape() == [8, 32]
    assert not any(k.startswith("model.layers.2.self_attn") for k in keys)
    assert not any(k.startswith("model.layers.4.mlp") for k in keys)


def test_decilm_config_round_trips(uniform_heads_dir, tmp_path):
    out = export(uniform_heads_dir, "decilm", tmp_path / "decilm")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig"
    written = json.loads((out / "config.json").read_text())["block_configs"]
    assert json.loads(json.dumps(config.to_dict()["block_configs"])) == written
    # engines read sections as attributes; an absent ffn_mult is an absent attribute
    assert config.block_configs[2].attention.no_op is True
    assert config.block_configs[1].attention.n_heads_in_group == 2
    assert not hasattr(config.block_configs[1].ffn, "ffn_mult")
    assert config.block_configs[1].ffn.intermediate_size == 56
    config.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["block_configs"] == written


def test_decilm_export_gives_the_same_logits_and_generation(uniform_heads_dir, tmp_path):
    model, _ = load_model(uniform_heads_dir)
    out = export(uniform_heads_dir, "decilm", tmp_path / "decilm")
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    prompt = ids[:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(remote.generate(prompt, **kwargs), model.generate(prompt, **kwargs))


def test_decilm_refuses_per_layer_query_heads_before_loading(tmp_path, monkeypatch):
    directory = saved(widths_model(per_layer_kv=True), tmp_path / "pruned")

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr("secateurs.models.load_model", no_loading)
    with pytest.raises(UnsupportedModelError, match="--target vllm"):
        export(directory, "decilm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_llama_families_are_refused_with_the_reason(tmp_path):
    directory = saved(tiny_model("gpt2"), tmp_path / "gpt2")
    for fmt in ("decilm", "gguf"):
        with pytest.raises(UnsupportedModelError, match="not one"):
            check_export(directory, fmt)
    check_export(directory, "hf")  # a plain, unpruned GPT-2 is a plain checkpoint


def test_decilm_engines_narrow_for_inexact_widths_and_biases():
    from secateurs.export.decilm import BROAD, ENGINES, engines
    from secateurs.export.layout import LayerShape, Layout

    config = {"hidden_size": 576, "num_attention_heads": 9}
    exact = Layout(config, (LayerShape(9, 3, 1536), LayerShape(9, 3, 1280), LayerShape(0, 0, 0)))
    assert engines(exact) == ENGINES  # 1536 and 1280: ffn_mult 4.0 and 3.333333 give them back
    assert engines(Layout(config, (LayerShape(9, 3, 1216),))) == BROAD  # only vLLM reads it
    assert engines(Layout({**config, "mlp_bias": True}, exact.layers)) == BROAD


def test_ffn_mult_only_where_exact_and_unbiased():
    from secateurs.export.decilm import decilm_config
    from secateurs.export.layout import LayerShape, Layout

    config = {"hidden_size": 576, "num_attention_heads": 9, "model_type": "llama"}
    layers = (LayerShape(9, 3, 1536), LayerShape(9, 3, 1216), LayerShape(9, 3, 0))
    ffns = [b["ffn"] for b in decilm_config(Layout(config, layers))["block_configs"]]
    assert ffns[0] == {
        "no_op": False,
        "replace_with_linear": False,
        "ffn_mult": 4.0,
        "intermediate_size": 1536,
    }
    assert "ffn_mult" not in ffns[1] and ffns[1]["intermediate_size"] == 1216
    assert ffns[2]["ffn_mult"] is None and ffns[2]["no_op"] is True
    biased = decilm_config(Layout({**config, "attention_bias": True}, layers))["block_configs"]
    assert "ffn_mult" not in biased[0]["ffn"]  # SGLang / TRT-LLM would drop the biases


# --- gguf --------------------------------------------------------------------------------------
def _fields(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return fields, shapes


def test_gguf_per_layer_arrays_and_shapes_match(uniform_heads_dir, tmp_path):
    path = export(uniform_heads_dir, "gguf", tmp_path / "m.gguf", dtype="f32")
    fields, shapes = _fields(path)
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [2, 2, 0, 2, 2, 2]
    assert fields["deci.attention.head_count_kv"] == [1, 1, 0, 1, 1, 1]
    assert fields["deci.feed_forward_length"] == [64, 56, 48, 40, ZERO_FFN, 24]
    assert fields["deci.attention.key_length"] == 8
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == 128
    assert shapes["blk.1.attn_q.weight"] == (16, 32)
    assert shapes["blk.1.attn_k.weight"] == (8, 32)
    assert shapes["blk.3.ffn_down.weight"] == (32, 40)
    assert shapes["blk.4.ffn_down.weight"] == (32, ZERO_FFN)
    assert not any(name.startswith("blk.2.attn") for name in shapes)
    assert "output.weight" not in shapes  # tied: llama.cpp reuses token_embd


def test_gguf_zero_ffn_and_rope_permutation(uniform_heads_dir, tmp_path):
    path = export(uniform_heads_dir, "gguf", tmp_path / "m.gguf", dtype="f32")
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    for name in ("ffn_gate", "ffn_up", "ffn_down", "ffn_norm"):
        assert not tensors[f"blk.4.{name}.weight"].any()  # adds exactly nothing
    model, _ = load_model(uniform_heads_dir)
    q = model.model.layers[1].self_attn.q_proj.weight.detach()
    permuted = torch.from_numpy(tensors["blk.1.attn_q.weight"])
    assert torch.equal(permuted, rope_permute(q, 2))
    # rotate-half pairs (i, i + d/2) become adjacent rows (2i, 2i + 1) within each head
    head = q[:8]
    assert torch.equal(permuted[:8][0::2], head[:4]) and torch.equal(permuted[:8][1::2], head[4:])


def test_gguf_of_a_uniform_model_is_plain_llama(tmp_path):
    directory = saved(tiny_model("llama"), tmp_path / "dense", bpe_tokenizer())
    fields, shapes = _fields(export(directory, "gguf", tmp_path / "m.gguf"))
    assert fields["general.architecture"] == "llama"
    assert fields["llama.attention.head_count"] == 4
    assert fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.feed_forward_length"] == 64
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert shapes["blk.0.attn_norm.weight"] == (32,)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def llama3_model() -> torch.nn.Module:
    from tiny_models import TINY_CONFIGS

    config = AutoConfig.for_model("llama", **TINY_CONFIGS["llama"], rope_parameters=LLAMA3_ROPE)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


def test_gguf_llama3_rope_factors_are_transformers_frequency_ratios(tmp_path):
    model = llama3_model()
    directory = saved(model, tmp_path / "l3", bpe_tokenizer())
    path = export(directory, "gguf", tmp_path / "m.gguf", dtype="f32")
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    d = 8  # head_dim
    plain = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaled = model.model.rotary_emb.inv_freq.to(torch.float64)
    expected = (plain / scaled).float().numpy()
    assert not np.allclose(expected, 1.0)  # the scaling is exercised
    np.testing.assert_allclose(tensors["rope_freqs.weight"], expected, rtol=1e-6)


def test_gguf_needs_the_tokenizer_and_says_so_before_loading(tmp_path, monkeypatch):
    directory = saved(tiny_model("llama"), tmp_path / "no-tok")  # saved without a tokenizer
    monkeypatch.setattr("secateurs.models.load_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="tokenizer"):
        export(directory, "gguf", tmp_path / "m.gguf")


def test_gguf_refuses_layer0_without_attention(tmp_path):
    model = apply_plan(tiny_model("llama"), Plan(num_layers=6, attn=(0,)))
    directory = saved(model, tmp_path / "p", bpe_tokenizer())
    with pytest.raises(UnsupportedModelError, match="layer 0"):
        export(directory, "gguf", tmp_path / "m.gguf")


# --- hf ----------------------------------------------------------------------------------------
def test_hf_export_of_uniform_widths_is_plain(tmp_path):
    from secateurs.adapters import adapter_for
    from secateurs.units.width import update_config, widths

    model = tiny_model("llama")
    adapter = adapter_for(model)
    original = widths(model, adapter)[0]
    for layer in range(6):
        prune_layer(model, adapter, layer, "channels", range(16))
    assert update_config(model, adapter, original)
    directory = saved(model, tmp_path / "u")
    out = export(directory, "hf", tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits)
    record = json.loads((out / "export.json").read_text())
    assert record["format"] == "hf" and record["per_layer_config"] == {}


def test_hf_refuses_per_layer_structure_and_records_per_layer_config(uniform_heads_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--target hf"):
        export(uniform_heads_dir, "hf", tmp_path / "hf")
    out = export(uniform_heads_dir, "decilm", tmp_path / "d")
    per_layer = json.loads((out / "export.json").read_text())["per_layer_config"]
    assert per_layer["2"] == {"skip": ["attention"], "intermediate_size": 48}
    assert per_layer["4"]["skip"] == ["mlp"]


def test_engines_record_per_output_kind(uniform_heads_dir):
    model, _ = load_model(uniform_heads_dir)
    kinds = engines_for_model(model, plain=False)
    assert read_record(uniform_heads_dir)["engines"] == kinds  # what save_checkpoint recorded
    assert set(kinds) == set(EXPORTS.names())
    assert kinds["hf"]["expressible"] is False
    assert "vLLM" in kinds["decilm"]["engines"] and "llama.cpp" in kinds["gguf"]["engines"]


# --- --target ----------------------------------------------------------------------------------
def test_target_constraints_map_onto_allocation_options():
    assert width_constraints(None, unit="width", allocation="global") == {
        "round_to": 1,
        "uniform_widths": False,
    }
    assert width_constraints("vllm", unit="width", allocation="global", round_to=48) == {
        "compensate": None,
        "round_to": 192,
        "uniform_widths": ("heads",),
    }
    sglang = width_constraints("sglang", unit="width", allocation="global")
    assert sglang["round_to"] == 256 and sglang["compensate"] is False
    with pytest.raises(ConfigError, match="no output biases"):
        width_constraints("tensorrt-llm", unit="width", allocation="global", compensate=True)
    hf = width_constraints("hf", unit="width", allocation="global")
    assert hf["uniform_widths"] == ("heads", "channels")
    assert width_constraints("llama.cpp", unit="width", allocation="global")["round_to"] == 32
    assert width_constraints("hf", unit="channels", allocation="uniform")["uniform_widths"] is False
    with pytest.raises(ConfigError, match="--layers"):
        width_constraints("vllm", unit="width", allocation="global", layers="2:4")


def test_uniform_heads_with_global_channels():
    generator = torch.Generator().manual_seed(0)
    tables = [
        UnitTable(
            "heads",
            tuple(torch.rand(3, generator=generator) * (i + 1) for i in range(4)),
            (90,) * 4,
        ),
        UnitTable(
            "channels",
            tuple(torch.rand(64, generator=generator) * (i + 1) for i in range(4)),
            (3,) * 4,
        ),
    ]
    removed = allocate(tables, 500, range(4), "global", Bounds(round_to=8), ("heads",))
    assert len({len(r) for r in removed["heads"]}) == 1
    kept = [64 - len(r) for r in removed["channels"]]
    assert len(set(kept)) > 1 and all(k % 8 == 0 for k in kept)
    # channels are re-allocated for what evened-out heads left: the target is still met
    total = 90 * sum(map(len, removed["heads"])) + 3 * sum(map(len, removed["channels"]))
    assert abs(total - 500) <= 4 * 4 * 3  # channel rounding: at most 4 per layer either way


def test_cli_prune_target_vllm_gives_a_decilm_expressible_model(tmp_path):
    directory = saved(tiny_model("llama"), tmp_path / "dense", bpe_tokenizer())
    out = tmp_path / "pruned"
    args = ["prune", str(directory), "--unit", "width", "--criterion", "magnitude"]
    args += ["--ratio", "0.3", "--allocation", "global", "--target", "vllm", "--out", str(out)]
    assert main(args) == 0
    layout = read_layout(out)
    assert layout.query_heads() == {2}  # one of two KV groups gone, alike in every layer
    assert all(s.channels % 64 == 0 for s in layout.layers)
    assert main(["export", str(out), "--to", "decilm", "--out", str(tmp_path / "d")]) == 0
    assert read_record(out)["engines"]["decilm"]["expressible"] is True


def test_cli_export_refusal_is_a_clear_error(uniform_heads_dir, tmp_path, capsys):
    assert main(["export", str(uniform_heads_dir), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
    assert "--target hf" in capsys.readouterr().err


# --- llama.cpp (where a build is cached) -------------------------------------------------------
def _scorer() -> Path | None:
    root = os.environ.get(LLAMACPP_ENV)
    path = Path(root) / "build" / "bin" / "llama_nll" if root else None
    return path if path is not None and path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_scorer() is None, reason=f"no llama.cpp build cached (${LLAMACPP_ENV})")
@pytest.mark.parametrize("kind", ["dense", "pruned", "llama3-rope"])
def test_llama_cpp_runs_our_gguf_with_transformers_logits(uniform_heads_dir, tmp_path, kind):
    models = {"dense": lambda: tiny_model("llama"), "llama3-rope": llama3_model}
    pruned = kind not in models
    directory = (
        uniform_heads_dir if pruned else saved(models[kind](), tmp_path / "d", bpe_tokenizer())
    )
    model, _ = load_model(directory)
    path = export(directory, "gguf", tmp_path / "m.gguf", dtype="f32")
    ids = tokens(batch=2, length=16).to(torch.int32)
    ids.numpy().tofile(tmp_path / "ids.i32")
    run = subprocess.run(
        [str(_scorer()), str(path), str(tmp_path / "ids.i32"), "16", "2", str(tmp_path / "l.f32")],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    nll = sum(float(line.split()[1]) for line in run.stdout.splitlines())
    with torch.no_grad():
        logits = model(ids.long()).logits
    expected = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids.long()[:, 1:].reshape(-1), reduction="sum"
    )
    assert nll == pytest.approx(float(expected), rel=1e-4)
    last = torch.from_numpy(np.fromfile(tmp_path / "l.f32", dtype=np.float32))
    torch.testing.assert_close(last, logits[0, -1], atol=1e-4, rtol=1e-4)
