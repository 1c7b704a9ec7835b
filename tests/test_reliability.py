"""Bad input and interruptions get clear messages, never a silently wrong or half-written output.

One test per item of the reliability issue: concurrent writers (two real processes), Ctrl-C
during an --overwrite swap, umask, read-only output and full disk before any work, truncated
weights, non-UTF-8 text, config.json that is not JSON, NaN weights, unsupported architectures
refused from config.json alone, --seq-len beyond the model's positions, no data and no hub,
the load report, the printed loading notes, a fast --help.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import secateurs.commands.eval_ppl as eval_ppl_command
import secateurs.commands.prune as prune_command
from secateurs import data as data_module
from secateurs import outputs
from secateurs.checkpoint import read_config
from secateurs.cli import main
from secateurs.data import read_documents
from secateurs.errors import (
    ConfigError,
    DataError,
    ModelFileError,
    OutputError,
    UnsupportedModelError,
)
from secateurs.models import load_model, model_type_of
from secateurs.plan import Plan, Unit
from secateurs.units import apply_plan
from secateurs.writer import save_checkpoint
from tiny_models import tiny_model, tokens

SRC = str(Path(__file__).resolve().parents[1] / "src")
TESTS = str(Path(__file__).resolve().parent)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, TESTS]), "OMP_NUM_THREADS": "1"}


def _no_load(monkeypatch, *modules):
    """Make loading a model fail the test: the error must come before any weight is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the problem was reported")

    for module in modules:
        monkeypatch.setattr("secateurs.models.load_model", refuse)
        monkeypatch.setattr(f"{module.__name__}.load_model", refuse, raising=False)


# --- outputs: one writer, atomic swap, umask, read-only, disk full ----------------------------

HOLDER = """
import sys, time
from pathlib import Path
from secateurs import writer
from tiny_models import tiny_model
model = tiny_model("llama")
real = writer.write_weights
def slow_save(*args, **kwargs):
    Path(sys.argv[2]).write_text("saving")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
    real(*args, **kwargs)
writer.write_weights = slow_save
writer.save_checkpoint(model, None, sys.argv[1], {"writer": "first"})
print("saved:", sys.argv[1])
"""


def test_concurrent_writer_is_refused_while_the_first_saves(model_dir, tmp_path):
    """Two real processes: the second prune to the same --out fails at once, naming the first;
    the first completes."""
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(started), str(go)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not started.exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "secateurs.cli", "prune", str(model_dir)]
            + ["--criterion", "magnitude", "--remove", "1", "--out", str(out)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        go.write_text("go")
        stdout, stderr = first.communicate(timeout=120)
    assert second.returncode == 2 and "saved:" not in second.stdout
    assert f"(pid {first.pid}) is writing" in second.stderr
    assert first.returncode == 0 and "saved:" in stdout, stderr
    assert json.loads((out / "secateurs.json").read_text())["writer"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_two_prunes_at_once_exactly_one_wins(model_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "secateurs.cli", "prune", str(model_dir)]
    command += ["--criterion", "magnitude", "--remove", "1", "--out", str(out)]
    procs = [
        subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *[s.decode() for s in p.communicate()]) for p in procs]
    winners = [r for r in results if r[0] == 0 and "saved:" in r[1]]
    losers = [r for r in results if r[0] == 2]
    assert len(winners) == 1 and len(losers) == 1, results
    assert "is writing" in losers[0][2] or "--overwrite" in losers[0][2]


def test_ctrl_c_during_overwrite_swap_leaves_no_hidden_copy(tmp_path, monkeypatch):
    out = tmp_path / "out"
    save_checkpoint(tiny_model("llama"), None, out, {"version": 1})
    real_rmtree = outputs.shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if ".old-" in str(path):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the old copy is being deleted
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", interrupted_rmtree)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tiny_model("llama"), None, out, {"version": 2}, overwrite=True)
    assert json.loads((out / "secateurs.json").read_text())["version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_leftovers_of_a_killed_writer_are_cleared(tmp_path):
    (tmp_path / ".out.old-123").mkdir()
    (tmp_path / ".out.partial-123-abc").mkdir()
    save_checkpoint(tiny_model("llama"), None, tmp_path / "out", {})
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_directories_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_checkpoint(tiny_model("llama"), None, tmp_path / "out", {})
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755


def test_a_refused_run_leaves_no_claim_on_its_output(model_dir, tmp_path):
    from secateurs import prune

    out = tmp_path / "runs" / "p"
    with pytest.raises(ConfigError, match="only 5 of 6 are removable"):
        prune(str(model_dir), remove=31, protect="none", out=out)
    assert list(out.parent.iterdir()) == [] and out not in outputs._HELD


def test_unwritable_output_is_refused_before_loading(model_dir, monkeypatch, capsys):
    _no_load(monkeypatch, prune_command)
    out = "/proc/self/secateurs-out/pruned"  # not writable, even for root
    code = main(
        ["prune", str(model_dir), "--criterion", "magnitude", "--remove", "1"]
        + [
            "--out",
            out,
        ]
    )
    assert code == 2
    assert "/proc/self/secateurs-out" in capsys.readouterr().err


def test_disk_full_names_path_and_space_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: os.statvfs_result((0,) * 10))
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(OutputError, match=r"needs about 0\.\d\d GB; 0\.00 GB free") as info:
        save_checkpoint(tiny_model("llama"), None, tmp_path / "out", {})
    assert str(tmp_path / "out") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing_is_a_clear_error(tmp_path, monkeypatch):
    model = tiny_model("llama")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("secateurs.writer.write_weights", full)
    with pytest.raises(OutputError, match="Not enough disk space to write"):
        save_checkpoint(model, None, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


# --- unreadable inputs --------------------------------------------------------------------------


def test_truncated_safetensors_is_named(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match=r"model\.safetensors is truncated"):
        load_model(model_dir)


def test_non_utf8_calibration_file_is_named(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_bytes("caf\xe9 au lait\n\nsecond".encode("latin-1"))
    with pytest.raises(DataError, match=r"calib\.txt is not UTF-8 text \(byte 3"):
        read_documents(path)


def test_config_json_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelFileError, match=r"config\.json is not valid JSON"):
        load_model(model_dir)


def test_nan_weights_are_named_with_their_layer(model_dir, monkeypatch, capsys):
    state = load_file(model_dir / "model.safetensors")
    state["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"not finite.*layers\.2\.mlp.*\(layer 2, mlp\)"):
        load_model(model_dir)
    code = main(
        ["prune", str(model_dir), "--criterion", "magnitude", "--remove", "1"]
        + [
            "--out",
            str(model_dir.parent / "out"),
        ]
    )
    assert code == 2 and "weights are not finite" in capsys.readouterr().err


def test_unsupported_architecture_refused_from_config_alone(tmp_path, capsys):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))  # no weights at all
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        load_model(folder, require_adapter=True)
    code = main(["prune", str(folder), "--remove", "1", "--out", str(tmp_path / "o")])
    assert code == 2 and "'mamba' is not supported" in capsys.readouterr().err


def test_unsupported_gguf_refused_from_its_metadata(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert model_type_of(path) == "mamba"
    with pytest.raises(UnsupportedModelError, match="'mamba'"):
        load_model(path, require_adapter=True)


# --- eval ppl: positions, data reachability, Ctrl-C, several models ----------------------------


def test_seq_len_beyond_positions_refused_before_loading(model_dir, monkeypatch, capsys):
    _no_load(monkeypatch, eval_ppl_command)
    code = main(["eval", "ppl", str(model_dir), "--seq-len", "100000"])
    err = capsys.readouterr().err
    assert code == 2 and "128 positions" in err and "max_position_embeddings" in err


def test_seq_len_beyond_gpt2_positions_in_the_api(tokenizer):
    from secateurs.evaluate.ppl import PPLProtocol, perplexity

    model = tiny_model("gpt2")  # n_positions = 128
    with pytest.raises(ConfigError, match="128 positions"):
        perplexity(model, tokenizer, PPLProtocol(seq_len=512))


def test_no_data_and_no_hub_fails_fast_before_loading(model_dir, monkeypatch, capsys):
    monkeypatch.delenv("SECATEURS_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_module.hub_reachable.cache_clear()
    _no_load(monkeypatch, eval_ppl_command)
    start = time.perf_counter()
    code = main(["eval", "ppl", str(model_dir)])
    assert code == 2 and time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert "hub cannot be reached" in err and err.count("\n") == 1
    data_module.hub_reachable.cache_clear()


def test_ctrl_c_in_the_evaluation_loop_exits_cleanly(model_dir, data_dir, monkeypatch, capsys):
    import secateurs.evaluate.ppl as ppl

    calls = []

    def interrupted(model, windows):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(ppl, "window_nll", interrupted)
    code = main(["eval", "ppl", str(model_dir), "--seq-len", "16", "--data-dir", str(data_dir)])
    assert code == 130 and calls == [1] and "interrupted" in capsys.readouterr().err


def test_eval_several_models_warns_and_saves_the_dense_point(model_dir, data_dir, tmp_path, capsys):
    pruned = tmp_path / "pruned"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)  # a model far worse than its source
    save_checkpoint(model, None, pruned, {"source_model": str(model_dir)})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (pruned / name).write_bytes((model_dir / name).read_bytes())
    flags = ["--seq-len", "16", "--max-windows", "2", "--data-dir", str(data_dir), "--save"]
    assert main(["eval", "ppl", str(model_dir), str(pruned), *flags]) == 0
    captured = capsys.readouterr()
    assert f"warning: {pruned}: wikitext2 PPL" in captured.err and "its dense model" in captured.err
    results = json.loads((pruned / "results.json").read_text())
    assert results["dense"]["model"] == str(model_dir)
    assert results["dense"]["parameters"] == results["parameters"]
    dense_ppl = results["dense"]["ppl"]["wikitext2"]["ppl"]
    assert results["ppl"]["wikitext2"]["ppl"] > 10 * dense_ppl


# --- loading: notes, load report ---------------------------------------------------------------


@pytest.mark.parametrize("unit", ["block", "attn", "mlp"])
def test_prune_prints_the_right_loading_note(model_dir, tmp_path, unit, capsys):
    out = tmp_path / unit
    args = ["prune", str(model_dir), "--unit", unit, "--criterion", "magnitude", "--remove", "1"]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "secateurs.json").read_text())
    assert f"loading: {record['loading']['how']}" in printed
    if unit == "block":
        assert (
            record["loading"]["plain_transformers"] and "from_pretrained(dir) loads it" in printed
        )
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    else:
        assert "removed attention/MLP branches" in printed and "secateurs.load_model" in printed
        marked = json.loads((out / "config.json").read_text())["model_type"]
        assert marked.startswith("secateurs-pruned-llama; ")
        assert read_config(out).model_type == "llama"


def test_load_report_is_silenced_for_repaired_weights_only(tmp_path, capfd):
    model = tiny_model("llama")
    apply_plan(model, Plan.of_units(6, [Unit(2, "attn")]))
    save_checkpoint(model, None, tmp_path / "out", {})
    capfd.readouterr()
    reloaded, _ = load_model(tmp_path / "out")
    assert "LOAD REPORT" not in capfd.readouterr().err
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, model(tokens()).logits)
    state = load_file(tmp_path / "out" / "model.safetensors")
    del state["model.layers.4.mlp.up_proj.weight"]  # a real problem must still be reported
    save_file(state, tmp_path / "out" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"missing \['model\.layers\.4\.mlp\.up_proj"):
        load_model(tmp_path / "out")


# --- the first hour: --help ----------------------------------------------------------------------

HEAVY = ("torch", "transformers", "lm_eval", "peft", "matplotlib", "datasets")


def test_help_imports_no_heavy_library():
    code = (
        "import sys, contextlib, io\n"
        "from secateurs.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try: main(['--help'])\n"
        "    except SystemExit: pass\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
        "print(out.getvalue().splitlines()[2])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60
    )
    heavy, first_line = result.stdout.splitlines()[:2]
    assert heavy == "[]", result.stdout + result.stderr
    assert first_line.startswith("Structured pruning of Hugging Face causal LMs")


def test_bench_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in (
        ("--batch-sizes", "1,4,16"),
        ("--new-tokens", "128"),
        ("--prompt-len", "16"),
        ("--repeats", "3"),
        ("--warmup", "1"),
        ("--seed", "0"),
    ):
        assert option in text and f"(default: {default})" in text, option


def test_prune_help_names_every_unit_kind_and_explains_the_jargon(capsys):
    from secateurs.spec import UNIT_WORDS

    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--unit UNIT what to remove")
    unit_help = text[start : text.index("--criterion CRITERION", start)]
    for word in [*UNIT_WORDS, "block,width"]:  # every --unit word: subblock, auto included
        assert re.search(rf"(?<![\w,-]){word}(?![\w,-])", unit_help), word
    for explained in (
        "'sl' = Shortened LLaMA's set (the first four and the last two: 0,1,2,3,L-2,L-1)",
        "--heal-target {local,dense} what --heal reproduces: local = what the removed blocks "
        "added to the stream (default); dense = the dense model's stream after them",
        "--shortlist SHORTLIST greedy ppl search: candidates re-scored per step after the first "
        "full step ('all' = exact greedy, 0 = the first step's ranking). Default: 3",
        "--reconstruct-damping RECONSTRUCT_DAMPING how strongly that fit is pulled towards the "
        "plainly sliced weights",
    ):
        assert explained in text, explained


def test_data_dir_help_matches_the_readme(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "ppl", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: $SECATEURS_DATA_DIR if set, else the Hugging Face hub" in text
    readme = " ".join((Path(__file__).resolve().parents[1] / "README.md").read_text().split())
    assert "`--data-dir`, else `$SECATEURS_DATA_DIR`, else the Hugging Face hub" in readme


def test_eval_ppl_flags_match_the_library():
    from secateurs.evaluate import ppl

    assert eval_ppl_command.BOS_POLICIES == ppl.BOS_POLICIES
