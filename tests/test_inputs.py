"""Bad inputs get one clear line, before any heavy work (issue 26, part A).

Each bad input is given to every command that reads it, and the test checks the exact message
and that the problem was found before the weights were read: either the loader is replaced by
one that fails the test, or (for errors the command line or the files alone show) a fresh
process is checked not to have imported torch at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs import data as data_module
from secateurs import models
from secateurs.cli import main
from secateurs.errors import ConfigError, ModelFileError
from secateurs.evaluate.efficiency import BenchConfig, Candidate, benchmark
from secateurs.models import check_model_files, load_model, resolve_model
from secateurs.registry import Registry
from test_export import bpe_tokenizer, saved, widths_model
from tiny_models import tiny_model, tokens

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _data(data_dir, monkeypatch):
    """A data directory, so that commands get as far as the model (here and in subprocesses)."""
    monkeypatch.setenv("SECATEURS_DATA_DIR", str(data_dir))


@pytest.fixture
def no_load(monkeypatch):
    """Reading weights (or converting a GGUF) fails the test: errors must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the problem was reported")

    monkeypatch.setattr("secateurs.reload.load_checkpoint", refuse)
    monkeypatch.setattr("secateurs.models.load_gguf", refuse)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_module.hub_reachable.cache_clear()
    yield
    data_module.hub_reachable.cache_clear()


def _copy(model_dir: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / name))


def _cut(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _error(capsys) -> str:
    """The one line the CLI printed on stderr."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


LIGHT_CLI = """
import sys
from secateurs.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:  # argparse refusals
    code = exit.code
print(code, ",".join(m for m in ("torch", "transformers") if m in sys.modules) or "-")
"""


def _light_cli(*argv: str, **env: str) -> tuple[int, str, str]:
    """Run the CLI in a fresh process: (exit code, heavy modules it imported, stderr)."""
    environ = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), **env}
    run = subprocess.run(
        [sys.executable, "-c", LIGHT_CLI, *argv],
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
    )
    code, heavy = run.stdout.split()[-2:]
    return int(code), heavy, run.stderr


# --- model files: truncated safetensors, one check for every command ---------------------------


@pytest.fixture
def truncated_dir(model_dir, tmp_path):
    path = _copy(model_dir, tmp_path, "truncated")
    weights = path / "model.safetensors"
    _cut(weights, weights.stat().st_size - 1000)
    return path


TRUNCATED = (
    "model.safetensors is truncated: {size:,} bytes, its header needs {need:,} (1,000 missing)"
)


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "ppl", "{m}"],
        ["eval", "zeroshot", "{m}", "--data-dir", "{data}"],
        ["bench", "{m}"],
        ["export", "{m}", "--to", "hf", "--out", "{tmp}/e"],
        ["score", "{m}", "--calibration", "{calib}", "--out", "{tmp}/s.json"],
        ["recover", "{m}", "--tokens", "1024", "--data", "{calib}", "--out", "{tmp}/r"],
        ["prune", "{m}", "--remove", "1", "--protect", "none", "--out", "{tmp}/p"],
    ],
    ids=lambda c: " ".join(w for w in c if not w.startswith(("{", "-")) and not w.isdigit()),
)
def test_truncated_weights_named_with_the_bytes_missing_by_every_command(
    command, truncated_dir, data_dir, calibration_file, tmp_path, no_load, capsys
):
    values = {"m": truncated_dir, "data": data_dir, "tmp": tmp_path, "calib": calibration_file}
    argv = [word.format(**values) for word in command]
    assert main(argv) == 2
    size = (truncated_dir / "model.safetensors").stat().st_size
    expected = TRUNCATED.format(size=size, need=size + 1000)
    assert f"{truncated_dir / expected}. Copy or download it again." in _error(capsys)


def test_prune_flow_check_names_the_truncated_file_before_any_reader(truncated_dir, no_load):
    # secateurs prune calls check_model_files first (before its memory-fit reader)
    with pytest.raises(ModelFileError, match="is truncated: .* \\(1,000 missing\\)"):
        check_model_files(truncated_dir)


def test_truncated_file_is_reported_without_importing_torch(truncated_dir):
    code, heavy, err = _light_cli("eval", "ppl", str(truncated_dir))
    assert code == 2 and heavy == "-" and "(1,000 missing)" in err


def test_prune_names_the_truncated_file_without_importing_torch(truncated_dir, tmp_path):
    out = str(tmp_path / "p")
    argv = ("prune", str(truncated_dir), "--remove", "1", "--protect", "none", "--out", out)
    code, heavy, err = _light_cli(*argv)
    assert (code, heavy) == (2, "-") and "(1,000 missing)" in err


def test_prune_flow_light_check_imports_no_torch(truncated_dir):
    script = (
        "import sys\nfrom secateurs.models import check_model_files\n"
        f"try:\n    check_model_files({str(truncated_dir)!r}, shapes=False)\n"
        "except Exception as err:\n    print(type(err).__name__, 'torch' in sys.modules)"
    )
    environ = {**os.environ, "PYTHONPATH": str(SRC)}
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environ
    )
    assert run.stdout.split() == ["ModelFileError", "False"], run.stderr


def test_bench_checks_every_model_before_loading_the_first(
    model_dir, truncated_dir, monkeypatch, capsys
):
    monkeypatch.setattr("secateurs.evaluate.efficiency.load_candidate", _fail)
    assert main(["bench", str(model_dir), str(truncated_dir)]) == 2
    assert f"{truncated_dir / 'model.safetensors'} is truncated" in _error(capsys)


def test_missing_or_truncated_shard_of_a_sharded_checkpoint(tmp_path, no_load):
    directory = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(directory, max_shard_size="50KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) > 2
    _cut(shards[1], 100)
    with pytest.raises(ModelFileError, match=f"{shards[1].name} is (truncated|not a valid)"):
        load_model(directory)
    shards[1].unlink()
    with pytest.raises(ModelFileError, match=f"{len(shards)} weight files, 1 of them missing"):
        load_model(directory)


def test_directory_without_weights(model_dir, tmp_path, no_load):
    path = _copy(model_dir, tmp_path, "no-weights")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="has a config.json but no weights"):
        load_model(path)


# --- GGUF files: truncated, damaged header, not GGUF ------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    from secateurs.export import export

    root = tmp_path_factory.mktemp("gguf")
    directory = saved(tiny_model("llama"), root / "tiny", bpe_tokenizer())
    return export(directory, "gguf", root / "tiny.gguf", dtype="f32")


def _damaged_gguf(gguf_file: Path, tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.gguf"
    data = bytearray(gguf_file.read_bytes())
    if kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "header":
        data[24:32] = struct.pack("<Q", 3)  # the first metadata key's length
    else:
        data = bytearray(b"this is a text file, not a model\n")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", r"is a truncated GGUF file \([\d,]+ bytes\): its header or tensor table "),
        ("header", r"is a damaged GGUF file \([\d,]+ bytes\): its header or tensor table "),
        ("not-gguf", r"is not a GGUF file: it does not start with the GGUF magic bytes "),
    ],
)
def test_damaged_gguf_is_named_before_conversion(
    kind, message, gguf_file, tmp_path, no_load, capsys
):
    path = _damaged_gguf(gguf_file, tmp_path, kind)
    for call in (load_model, lambda p: load_model(p, require_adapter=True), check_model_files):
        with pytest.raises(ModelFileError, match=re.escape(str(path)) + " " + message):
            call(path)
    assert main(["eval", "ppl", str(path)]) == 2
    assert str(path) in _error(capsys)
    code, heavy, err = _light_cli("eval", "ppl", str(path))
    assert code == 2 and heavy == "-" and f"{path} is" in err


def test_a_gguf_s_layer_count_refuses_the_budget_before_conversion(
    gguf_file, tmp_path, no_load, capsys
):
    """A GGUF (or an alias's) decoder depth is read from its metadata (``block_count``), so
    a budget it cannot meet is refused before the file is converted."""
    from secateurs.modelfiles import read_gguf

    fields = read_gguf(gguf_file).fields
    layers = int(fields["llama.block_count"].parts[fields["llama.block_count"].data[0]][0])
    out = tmp_path / "p"
    argv = ["prune", str(gguf_file), "--remove", str(layers), "--protect", "none", "--out"]
    assert main([*argv, str(out)]) == 2
    assert f"only {layers - 1} of {layers} are removable" in _error(capsys)
    assert not out.exists()


def test_the_header_reader_agrees_with_gguf_py_on_every_scalar_and_string(gguf_file):
    """``gguf_header_values`` (the fast path of the layer-count check) reads what gguf-py's
    full parser reads, for every scalar or string key, arrays skipped correctly on the way."""
    from gguf import GGUFValueType

    from secateurs.modelfiles import gguf_header_values, read_gguf

    expected = {}
    for name, field in read_gguf(gguf_file).fields.items():
        if name.startswith("GGUF."):  # the parser's own entries for the header's counts
            continue
        kind = field.types[0] if field.types else None
        if kind == GGUFValueType.STRING:
            expected[name] = bytes(field.parts[field.data[0]]).decode()
        elif kind is not None and kind != GGUFValueType.ARRAY:
            expected[name] = field.parts[field.data[0]][0].item()
    assert "llama.block_count" in expected and len(expected) > 5
    found = gguf_header_values(gguf_file, set(expected))
    assert found.keys() == expected.keys()
    for name, value in expected.items():  # float32 values: compared as gguf-py rounds them
        assert found[name] == (pytest.approx(value) if isinstance(value, float) else value), name


def test_undamaged_gguf_passes_the_check(gguf_file):
    check_model_files(gguf_file)  # the reader accepts what secateurs export writes


# --- weights whose shapes do not match config.json ---------------------------------------------


def test_shapes_that_differ_from_config_name_the_tensor_and_both_shapes(
    model_dir, tmp_path, no_load, capsys
):
    path = _copy(model_dir, tmp_path, "edited")
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 48  # the weights have 64
    (path / "config.json").write_text(json.dumps(config))
    expected = (
        f"{path}: the weights do not match config.json: model.layers.0.mlp.gate_proj.weight: "
        "file [64, 32], config [48, 32]; model.layers.0.mlp.up_proj.weight: file [64, 32], "
        "config [48, 32]; model.layers.0.mlp.down_proj.weight: file [32, 64], config [32, 48] "
        "(and 15 more)."
    )
    with pytest.raises(ModelFileError) as raised:
        load_model(path)
    assert str(raised.value).startswith(expected)
    assert main(["eval", "ppl", str(path)]) == 2 and expected in _error(capsys)


def test_a_mismatch_only_transformers_sees_is_still_one_line(model_dir, monkeypatch):
    def mismatched(*args, **kwargs):
        raise RuntimeError("You set `ignore_mismatched_sizes` to `False`, thus raising an error.")

    monkeypatch.setattr("secateurs.reload.load_checkpoint", mismatched)
    with pytest.raises(ModelFileError, match="the weights do not match config.json"):
        load_model(model_dir)


def test_damaged_tokenizer_json_is_named(model_dir, tmp_path, no_load, capsys):
    path = _copy(model_dir, tmp_path, "bad-tokenizer")
    (path / "tokenizer.json").write_text((path / "tokenizer.json").read_text()[:100])
    with pytest.raises(ModelFileError, match="tokenizer.json is not valid JSON .*damaged"):
        load_model(path)
    code, heavy, err = _light_cli("eval", "ppl", str(path))
    assert code == 2 and heavy == "-"
    assert f"{path / 'tokenizer.json'} is not valid JSON (Expecting" in err


# --- width-pruned checkpoints: no wrong warning, a refusal that says what works ----------------


def test_width_pruned_load_is_quiet_exact_and_plain_transformers_says_what_works(
    tmp_path, tokenizer, capfd
):
    model = widths_model(per_layer_kv=True)
    out = saved(model, tmp_path / "pruned", tokenizer)
    capfd.readouterr()
    reloaded, tokenizer = load_model(out)
    err = capfd.readouterr().err
    assert "to instantiate a model of type" not in err and "not sharded" not in err
    assert tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, model(tokens()).logits)
    for name in ("transformers.configuration_utils", "transformers.distributed.tensor_parallel"):
        assert logging.getLogger(name).filters == []  # the silencing ends with the load
    with pytest.raises(ValueError) as refused:
        AutoModelForCausalLM.from_pretrained(out)
    text = str(refused.value)
    assert "model type `secateurs-pruned-llama; no transformers version loads this pruned " in text
    assert "use secateurs.load_model(dir), or convert it for an engine with 'secateurs export'" in (
        text
    )


# --- export of a directory that does not exist -------------------------------------------------


def test_export_of_a_missing_directory(tmp_path, monkeypatch, no_load, capsys):
    missing = tmp_path / "runs" / "d6"
    assert main(["export", str(missing), "--to", "hf", "--out", str(tmp_path / "o")]) == 2
    assert f"No model at {missing}: no such file or directory." in _error(capsys)
    # a relative path that reads like a hub id, with the hub reachable: still named
    monkeypatch.setattr(data_module, "hub_reachable", lambda: True)
    assert main(["export", "runs/d6", "--to", "gguf", "--out", str(tmp_path / "o.gguf")]) == 2
    assert "No directory runs/d6: export converts a local checkpoint" in _error(capsys)


def test_export_of_a_missing_directory_offline(tmp_path):
    code, heavy, err = _light_cli(
        "export", "runs/d6", "--to", "hf", "--out", str(tmp_path / "o"), HF_HUB_OFFLINE="1"
    )
    assert code == 2 and heavy == "-"
    assert "'runs/d6' is neither a local path (no such file or directory) nor reachable" in err


# --- --dtype and --device, refused while parsing -----------------------------------------------

MODEL_COMMANDS = [
    ["eval", "ppl", "{m}"],
    ["eval", "zeroshot", "{m}"],
    ["score", "{m}", "--out", "{tmp}/s.json"],
    ["prune", "{m}", "--remove", "1", "--out", "{tmp}/p"],
    ["bench", "{m}"],
]
DTYPE_ERROR = (
    "argument --dtype: 'float12' is not a dtype secateurs loads models in; use one of: "
    "float32, bfloat16, float16, auto."
)


@pytest.mark.parametrize("command", MODEL_COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_unknown_dtype_is_refused_while_parsing(command, model_dir, tmp_path, no_load, capsys):
    argv = [w.format(m=model_dir, tmp=tmp_path) for w in command]
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--dtype", "float12"])
    assert exit.value.code == 2 and DTYPE_ERROR in capsys.readouterr().err


NO_CUDA = "CUDA is not available here"


@pytest.mark.parametrize(
    ("device", "gpu_build", "gpus", "message"),
    [
        ("cuda", False, 0, f"{NO_CUDA} (this torch is built without CUDA); use cpu."),
        ("cuda:1", True, 0, f"{NO_CUDA} (no GPU found); use cpu."),
        ("cuda:3", True, 2, "cuda:3 does not exist: this machine has 2 CUDA device(s), cuda:0 to "
         "cuda:1."),
        ("tpu", True, 0, "'tpu' is not a device; use cpu, cuda, mps or cuda:N."),
    ],
)  # fmt: skip
@pytest.mark.parametrize(
    "command", [*MODEL_COMMANDS, ["recover", "{m}", "--tokens", "8", "--out", "{tmp}/r"]]
)
def test_unavailable_device_is_refused_while_parsing(
    command, device, gpu_build, gpus, message, model_dir, tmp_path, monkeypatch, no_load, capsys
):
    monkeypatch.setattr(models, "_torch_has_gpu_build", lambda: gpu_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    argv = [w.format(m=model_dir, tmp=tmp_path) for w in command]
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--device", device])
    assert exit.value.code == 2 and f"argument --device: {message}" in capsys.readouterr().err


def test_dtype_and_device_refused_by_the_api_before_loading(model_dir, no_load):
    with pytest.raises(ConfigError, match="'float12' is not a dtype"):
        load_model(model_dir, dtype="float12")
    with pytest.raises(ConfigError, match="is not a device"):
        load_model(model_dir, device="gpu0")


def test_cpu_build_is_read_from_torch_without_importing_it():
    built = torch.version.cuda is not None or torch.version.hip is not None
    assert models._torch_has_gpu_build() is built


def test_dtype_and_device_errors_import_no_torch(model_dir):
    code, heavy, err = _light_cli("eval", "ppl", str(model_dir), "--dtype", "float12")
    assert code == 2 and heavy == "-" and DTYPE_ERROR in err
    if not models._torch_has_gpu_build():  # a GPU build asks torch how many GPUs it sees
        code, heavy, err = _light_cli("score", str(model_dir), "--out", "s", "--device", "cuda")
        assert code == 2 and heavy == "-" and "CUDA is not available here" in err


# --- bench beyond the model's positions --------------------------------------------------------


@pytest.fixture
def gpt2_dir(tmp_path, tokenizer):
    path = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(path)  # n_positions = 128, learned
    tokenizer.save_pretrained(path)
    return path


GPT2_REFUSAL = (
    "prompt_len 100 + new_tokens 64 = 164 tokens, longer than {name} supports (128 positions, "
    "config.n_positions): its learned position embeddings end there. Use 128 tokens or fewer."
)


def test_bench_refuses_learned_positions_before_loading(gpt2_dir, monkeypatch, capsys):
    monkeypatch.setattr("secateurs.evaluate.efficiency.load_candidate", _fail)
    assert main(["bench", str(gpt2_dir), "--prompt-len", "100", "--new-tokens", "64"]) == 2
    assert GPT2_REFUSAL.format(name=gpt2_dir) in _error(capsys)
    code, heavy, err = _light_cli(
        "bench", str(gpt2_dir), "--prompt-len", "100", "--new-tokens", "64"
    )
    assert code == 2 and heavy == "-" and GPT2_REFUSAL.format(name=gpt2_dir) in err


def test_bench_refuses_a_random_gpt2_config_before_building_it(gpt2_dir, monkeypatch, capsys):
    monkeypatch.setattr("secateurs.evaluate.efficiency.random_model", _fail)
    config = str(gpt2_dir / "config.json")
    argv = ["bench", "--random-config", config, "--prompt-len", "100", "--new-tokens", "64"]
    assert main(argv) == 2  # a GPT2Config answers n_positions as max_position_embeddings
    refusal = GPT2_REFUSAL.format(name=config).replace("n_positions", "max_position_embeddings")
    assert refusal in _error(capsys)


def test_benchmark_api_refuses_learned_positions_before_measuring(monkeypatch):
    monkeypatch.setattr("secateurs.evaluate.efficiency.generate_once", _fail)
    candidate = Candidate("gpt2", tiny_model("gpt2"))
    with pytest.raises(ConfigError, match=r"164 tokens, longer than gpt2 supports \(128"):
        benchmark([candidate], BenchConfig((1,), new_tokens=64, prompt_len=100), progress=False)


def test_bench_warns_past_rope_positions_and_measures(caplog):
    candidate = Candidate("llama", tiny_model("llama"))  # rotary, max_position_embeddings 128
    config = BenchConfig((1,), new_tokens=40, prompt_len=100, repeats=1, warmup=0)
    with caplog.at_level(logging.WARNING, logger="secateurs.evaluate.efficiency"):
        result = benchmark([candidate], config, progress=False)
    ours = [r.getMessage() for r in caplog.records if r.name == "secateurs.evaluate.efficiency"]
    assert ours == [
        "prompt_len 100 + new_tokens 40 = 140 tokens, beyond the 128 positions llama was trained "
        "for (config.max_position_embeddings): it runs there (rotary positions), but on "
        "positions it never saw."
    ]
    assert result["models"][0]["results"][0]["status"] == "ok"


def _fail(*args, **kwargs):
    raise AssertionError("the model was loaded or built before the length was checked")


# --- a hub id offline: at once, or from the local cache ----------------------------------------

OFFLINE = (
    "'someorg/no-such-model' is neither a local path (no such file or directory) nor reachable: "
    "the Hugging Face hub cannot be reached from here (or HF_HUB_OFFLINE is set) and the model "
    "is not in the local Hugging Face cache."
)


def test_unreachable_hub_id_fails_at_once(offline, monkeypatch, tmp_path, no_load, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for argv in (
        ["eval", "ppl", "someorg/no-such-model"],
        ["prune", "someorg/no-such-model", "--remove", "1", "--out", str(tmp_path / "p")],
        ["export", "someorg/no-such-model", "--to", "hf", "--out", str(tmp_path / "e")],
    ):
        start = time.perf_counter()
        assert main(argv) == 2
        assert time.perf_counter() - start < 5  # transformers' retries took 55-72 s
        assert OFFLINE in _error(capsys)


def test_unreachable_hub_id_fails_without_importing_torch(tmp_path):
    code, heavy, err = _light_cli(
        "eval", "ppl", "someorg/no-such-model", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path)
    )
    assert code == 2 and heavy == "-" and OFFLINE in err


def test_unreachable_hub_id_loads_from_the_local_cache(offline, model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert resolve_model("someorg/tiny") == str(snapshot)
    model, _ = load_model("someorg/tiny")
    assert model.config.num_hidden_layers == 6


# --- secateurs ls: no heavy import, registries checked against their tables ---------------------

LS_LIGHT = """
import sys
from secateurs.cli import main
from secateurs.criteria import CRITERIA
from secateurs.adapters import supported_model_types
main(["ls"])
try:
    CRITERIA.canonical("taylr")
except Exception as err:
    print(err)
print("llama" in supported_model_types(), "torch" in sys.modules, "transformers" in sys.modules)
"""


def test_ls_and_name_checks_import_no_heavy_library():
    environ = {**os.environ, "PYTHONPATH": str(SRC)}
    run = subprocess.run(
        [sys.executable, "-c", LS_LIGHT], capture_output=True, text=True, env=environ, timeout=60
    )
    lines = run.stdout.splitlines()
    assert lines[-1] == "True False False", run.stderr
    assert lines[-2].startswith("Unknown criterion 'taylr'. Did you mean 'taylor'? Known: ")
    assert "  taylor             [attn,block,channels,heads,mlp] Σ|W ⊙ ∂L/∂W|" in run.stdout
    assert "  llama              llama, mistral, qwen2, qwen3 [block,attn,mlp,heads,channels]" in (
        run.stdout
    )


def test_registry_tables_match_the_registered_objects():
    from secateurs.adapters import ARCHITECTURES
    from secateurs.criteria import CRITERIA

    # importing every module runs the registration check against the table
    criteria, adapters = dict(CRITERIA.items()), dict(ARCHITECTURES.items())
    assert sorted(criteria) == [name for name, _ in CRITERIA.catalog()]
    assert sorted(adapters) == [name for name, _ in ARCHITECTURES.catalog()]
    for name, info in CRITERIA.catalog():
        assert (criteria[name].units, criteria[name].summary) == (info["units"], info["summary"])
        assert criteria[name].accepts() == info["accepts"]  # --option names, checked lightly
    for name, info in ARCHITECTURES.catalog():
        assert adapters[name].model_types == info["model_types"]


@pytest.mark.parametrize(
    ("package", "marker"), [("criteria", "@CRITERIA.register("), ("adapters", "register_adapter(")]
)
def test_every_registering_module_is_in_its_table(package, marker):
    """A new criterion or adapter file must be declared, or it would never be imported."""
    from secateurs.adapters import TABLE as ADAPTERS
    from secateurs.criteria import TABLE as CRITERIA_TABLE

    declared = {row[1] for row in (CRITERIA_TABLE if package == "criteria" else ADAPTERS)}
    files = sorted((SRC / "secateurs" / package).glob("*.py"))
    registering = {f.stem for f in files if f.stem != "__init__" and marker in f.read_text()}
    assert registering == declared


def test_a_registration_that_drifts_from_its_declaration_is_refused():
    registry: Registry[object] = Registry("thing")
    registry.declare("alpha", "nowhere", aliases=("a",), units=frozenset({"block"}))

    class Alpha:
        units = frozenset({"block", "mlp"})

    with pytest.raises(ValueError, match="units frozenset.* != declared frozenset"):
        registry.add("alpha", Alpha, aliases=("a",))
    with pytest.raises(ValueError, match=r"aliases \(\) != \('a',\)"):
        registry.add("alpha", Alpha)
    assert registry.canonical("A") == "alpha" and "alpha" in registry and len(registry) == 1
    with pytest.raises(ModuleNotFoundError):
        registry.get("alpha")  # resolving a declared name imports its module


# --- prune's own flags, recipes and scores files: refused before any weight is read -------------

PRUNE_REFUSALS = {
    "ratio as a percent": (
        ["--ratio", "20"],
        "--ratio is a fraction of the decoder's parameters in (0, 1), not 20.0 (a percentage? "
        "use 0.2 for 20%).",
    ),
    "layers beyond the model": (
        ["--unit", "width", "--criterion", "magnitude", "--ratio", "0.2", "--layers", "40:50"],
        "--layers 40:50 is not inside 0:6.",
    ),
    "layers selecting none": (
        ["--unit", "width", "--criterion", "magnitude", "--ratio", "0.2", "--layers", "4:2"],
        "--layers 4:2 selects no layer: 0 <= START < STOP.",
    ),
    "remove more blocks than the model has": (
        ["--remove", "31", "--protect", "none"],
        "Asked to remove 31 block units but only 5 of 6 are removable (protected: []; at least "
        "one block must remain).",
    ),
    "blocks beyond the model": (
        ["--blocks", "3,40"],
        "Plan blocks [40] out of range for 6 layers.",
    ),
    "protected layer beyond the model": (
        ["--remove", "1", "--protect", "7"],
        "Protected layer 7 is out of range for 6 layers.",
    ),
    "a criterion that cannot score the unit": (
        ["--unit", "heads", "--ratio", "0.2"],
        "Criterion 'ppl' cannot score heads units; criteria that can: activation, fluctuation, "
        "hywia, influence, magnitude, mini-llm, submodel, taylor.",
    ),
    "unknown criterion option": (
        ["--remove", "1", "--option", "bogus=1"],
        "Criterion 'ppl' has no option bogus; its options: objective, top_k (with --iterative "
        "ppl or --unit subblock also the search's: batch_size).",
    ),
    "a search option without a search": (
        ["--unit", "width", "--criterion", "activation", "--ratio", "0.2", "--option", "top_k=8"],
        "--option top_k: options of the greedy depth search (--iterative with ppl, or --unit "
        "subblock), which this run does not do.",
    ),
    "the search's batch size without a search": (
        ["--remove", "1", "--option", "batch_size=4"],
        "--option batch_size: options of the greedy depth search (--iterative with ppl, or "
        "--unit subblock), which this run does not do.",
    ),
    "option value not YAML": (
        ["--remove", "1", "--criterion", "magnitude", "--option", "p=["],
        "--option p=[: the value is not a number, word or YAML list (expected the node content, "
        "but found '<stream end>').",
    ),
}


@pytest.mark.parametrize("case", PRUNE_REFUSALS)
def test_prune_refuses_bad_flags_before_reading_weights(case, model_dir, tmp_path, no_load, capsys):
    argv, message = PRUNE_REFUSALS[case]
    assert main(["prune", str(model_dir), *argv, "--out", str(tmp_path / "p")]) == 2
    assert _error(capsys) == f"secateurs: error: {message}\n"
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("case", PRUNE_REFUSALS)
def test_config_level_errors_import_neither_torch_nor_transformers(case, model_dir, tmp_path):
    """config.json is read as JSON (``preflight.check_source``) and the criteria's options and
    unit kinds come from the registry's table: no heavy import, no seconds spent on one."""
    argv, message = PRUNE_REFUSALS[case]
    runs = tmp_path / "runs"
    code, heavy, err = _light_cli("prune", str(model_dir), *argv, "--out", str(runs / "p"))
    assert (code, heavy) == (2, "-") and message in err
    assert [*runs.glob("*"), *runs.glob(".*")] == []  # no output, no lock file left


def test_an_option_value_is_checked_by_the_criterion_itself(model_dir, tmp_path, no_load, capsys):
    argv = ["prune", str(model_dir), "--remove", "1", "--criterion", "magnitude", "--option"]
    assert main([*argv, "p=-1", "--out", str(tmp_path / "p")]) == 2
    assert _error(capsys) == "secateurs: error: magnitude: p must be positive, got -1.\n"


SCORES_FILES = {
    "missing": (None, "--scores {path}: no such file."),
    "not JSON": (
        "not json",
        "--scores {path} is not a JSON scores file (Expecting value: line 1 column 1 (char 0)).",
    ),
    "without the keys": (
        '{"a": 1}',
        "--scores {path} lacks criterion, unit, values: not written by 'secateurs score'.",
    ),
    "a list": ("[1, 2]", "--scores {path} lacks criterion, unit, values: not written by "
               "'secateurs score'."),
    "values not numbers": (
        '{"criterion": "ppl", "unit": "block", "values": 5}',
        "--scores {path}: 'values' is not a list of numbers.",
    ),
    "another criterion": (
        '{"criterion": "taylor", "unit": "block", "values": [1, 2, 3, 4, 5, 6]}',
        "--scores {path} holds taylor/block scores, not ppl/block.",
    ),
    "another model": (
        '{"criterion": "ppl", "unit": "block", "values": [1, 2, 3]}',
        "--scores {path} covers 3 layers; the model has 6.",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", SCORES_FILES)
def test_bad_scores_file_is_named_before_reading_weights(
    case, model_dir, tmp_path, no_load, capsys
):
    content, message = SCORES_FILES[case]
    path = tmp_path / "scores.json"
    if content is not None:
        path.write_text(content)
    argv = ["prune", str(model_dir), "--remove", "1", "--protect", "none", "--scores", str(path)]
    assert main([*argv, "--out", str(tmp_path / "p")]) == 2
    assert _error(capsys) == f"secateurs: error: {message.format(path=path)}\n"


def test_a_scores_file_for_another_model_is_refused_without_importing_torch(model_dir, tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(SCORES_FILES["another model"][0])
    argv = ["prune", str(model_dir), "--remove", "1", "--protect", "none", "--scores", str(path)]
    code, heavy, err = _light_cli(*argv, "--out", str(tmp_path / "p"))
    assert (code, heavy) == (2, "-") and f"--scores {path} covers 3 layers" in err


RECIPES = {
    "not YAML": (
        "remove: [1\nunit: :\n",
        "Recipe {path} is not valid YAML at line 2, column 5: expected ',' or ']', but got ':'.",
    ),
    "a tab": (
        "remove: 1\n\tunit: block\n",
        "Recipe {path} is not valid YAML at line 2, column 1: found character '\\t' that cannot "
        "start any token.",
    ),
    "not UTF-8": (b"\xff\xfe", "Recipe {path} is not UTF-8 text (byte 0)."),
    "not a mapping": ("- a\n- b\n", "Recipe {path} must be a mapping of option: value."),
    "a fractional count": ("remove: 2.5\n", "--remove takes a positive whole number, not 2.5."),
}


@pytest.mark.parametrize("case", RECIPES)
def test_bad_recipe_is_named_without_importing_torch(case, model_dir, tmp_path):
    content, message = RECIPES[case]
    path = tmp_path / "recipe.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    argv = ("prune", str(model_dir), "--config", str(path), "--out", str(tmp_path / "p"))
    code, heavy, err = _light_cli(*argv)
    assert (code, heavy) == (2, "-")
    assert err == f"secateurs: error: {message.format(path=path)}\n"
