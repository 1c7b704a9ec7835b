"""What a new user meets in the first hour: generations beside the dense model's, a readable
PPL plot, clear messages for a damaged bench file and an existing output, outputs readable as
the umask says, a deliberate thread count, and zero-shot runs without the harness's noise."""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from secateurs import cli
from secateurs.cli import choose_threads, main
from secateurs.errors import ConfigError, OutputExistsError
from secateurs.evaluate.generate import distinct_ngrams, generate_greedy
from secateurs.evaluate.zeroshot import EXPECTED_WARNINGS, harness_quieted
from secateurs.outputs import atomic_directory, check_output_dir
from secateurs.report import load_runs, ppl_figure, read_results, save_results
from tiny_models import tiny_model, tiny_tokenizer

# --- generations --------------------------------------------------------------------------------


def test_distinct_ngrams_counts_repeated_word_pairs():
    assert distinct_ngrams("a king who was a king who was a king") == 4 / 9
    assert distinct_ngrams("Paris is the capital") == 1.0
    assert distinct_ngrams("Paris") is None  # no pair: nothing to judge
    assert distinct_ngrams("a b a b a", n=1) == 2 / 5


def _greedy_by_hand(model, tokenizer, prompt: str, steps: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def test_greedy_generation_is_the_argmax_continuation():
    model, tokenizer = tiny_model("llama").eval(), tiny_tokenizer()
    prompts = ("w5 w6 w7", "w40 w41")
    result = generate_greedy(model, tokenizer, prompts, new_tokens=6)
    for prompt, generation in zip(prompts, result.generations, strict=True):
        expected = _greedy_by_hand(model, tokenizer, prompt, 6)
        assert generation.new_tokens == len(expected)
        assert generation.text == tokenizer.decode(expected, skip_special_tokens=True).strip()
        assert generation.distinct == distinct_ngrams(generation.text)
    values = [g.distinct for g in result.generations if g.distinct is not None]
    assert result.mean_distinct == pytest.approx(sum(values) / len(values))
    assert result.protocol["decoding"] == "greedy" and result.protocol["new_tokens"] == 6


def test_bad_generation_arguments_are_refused():
    with pytest.raises(ConfigError, match="new_tokens must be positive"):
        generate_greedy(tiny_model("llama"), tiny_tokenizer(), ("w5",), new_tokens=0)


@pytest.fixture
def dense_and_pruned(tmp_path):
    dense, pruned = tmp_path / "dense", tmp_path / "pruned"
    tiny_model("llama").save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    assert main(["prune", str(dense), "--blocks", "1,2", "--out", str(pruned)]) == 0
    return dense, pruned


def test_eval_generate_saves_both_models_and_the_report_shows_them(dense_and_pruned, tmp_path):
    dense, pruned = dense_and_pruned
    prompts = ["--prompt", "w5 w6 w7", "--prompt", "w9 w10"]
    args = ["eval", "generate", str(dense), str(pruned), *prompts, "--new-tokens", "5", "--save"]
    assert main(args) == 0
    results = read_results(pruned)
    assert results["dense"]["model"] == str(dense)
    own = results["generations"]["generations"]
    base = results["dense"]["generations"]["generations"]
    assert [g["prompt"] for g in own] == [g["prompt"] for g in base] == ["w5 w6 w7", "w9 w10"]
    assert main(["report", str(pruned), "--out", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "index.md").read_text()
    assert "## Greedy generations" in page
    for mine, theirs in zip(own, base, strict=True):
        row = f"| {mine['prompt']} | {theirs['text'] or '(nothing)'} | "
        assert row in page and f"| {mine['text'] or '(nothing)'} |" in page


def test_eval_generate_save_keeps_the_dense_ppl_of_the_same_model(dense_and_pruned):
    dense, pruned = dense_and_pruned
    save_results(pruned, "dense", {"model": str(dense), "ppl": {"wikitext2": 12.5}})
    assert main(["eval", "generate", str(dense), str(pruned), "--new-tokens", "2", "--save"]) == 0
    entry = read_results(pruned)["dense"]
    assert entry["ppl"] == {"wikitext2": 12.5} and "generations" in entry


# --- the report -------------------------------------------------------------------------------


def test_ppl_plot_labels_every_point_and_ticks_in_plain_numbers(tmp_path):
    for name, params, ppl in (("d6", 113_000_000, 152.2), ("w20", 113_400_000, 130.7)):
        (tmp_path / name).mkdir()
        save_results(tmp_path / name, "parameters", params)
        save_results(tmp_path / name, "ppl", {"wikitext2": ppl})
    save_results(
        tmp_path / "d6",
        "dense",
        {"model": "base", "parameters": 134_500_000, "ppl": {"wikitext2": 63.8}},
    )
    fig = ppl_figure(load_runs([tmp_path / "d6", tmp_path / "w20"]))
    fig.canvas.draw()
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["base: 63.8", "d6: 152.2", "w20: 130.7"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["70", "100", "150"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"protocol": {}, "models": [', "is not valid JSON"),
        ("[1, 2]", "holds list, not a JSON object"),
        ('{"protocol": {}}', "has no 'models' list"),
        ('{"models": [{"name": "x"}]}', "a model entry without"),
    ],
)
def test_report_of_a_damaged_bench_file_says_so_before_writing(tmp_path, capsys, content, message):
    bench = tmp_path / "bench.json"
    bench.write_text(content)
    out = tmp_path / "report"
    assert main(["report", "--bench", str(bench), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(bench) in err and "Traceback" not in err
    assert not out.exists()


# --- outputs ------------------------------------------------------------------------------------


def test_existing_output_message_names_the_flag_and_the_python_argument(tmp_path):
    with pytest.raises(OutputExistsError) as caught:
        check_output_dir(tmp_path, overwrite=False)
    assert "pass --overwrite (from Python: overwrite=True)" in str(caught.value)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)],
)
def test_outputs_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "private.bin").write_bytes(b"x")
            (tmp / "private.bin").chmod(0o600)  # as safetensors' temporary files are
            (tmp / "sub").mkdir(mode=0o700)
            (tmp / "sub" / "tool").write_bytes(b"#!")
            (tmp / "sub" / "tool").chmod(0o700)
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert (out / "private.bin").stat().st_mode & 0o777 == file_mode
    assert out.stat().st_mode & 0o777 == dir_mode
    assert (out / "sub").stat().st_mode & 0o777 == dir_mode
    assert (out / "sub" / "tool").stat().st_mode & 0o777 == dir_mode  # executable stays so


def test_a_saved_checkpoint_is_readable_by_others_under_umask_022(dense_and_pruned):
    _, pruned = dense_and_pruned  # written with this process's umask
    mask = os.umask(0)
    os.umask(mask)
    for path in pruned.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path.name


def test_interrupted_recovery_message_names_the_flag_and_the_python_argument(tmp_path):
    from secateurs.recover.common import resume_point

    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(OutputExistsError) as caught:
        resume_point(tmp_path, resume=False)
    assert "pass --resume (from Python: resume=True) to continue it" in str(caught.value)


def test_record_holds_the_resolved_spec_the_command_each_phase_and_the_dtype(
    tmp_path, calibration_file, monkeypatch
):
    source, out = tmp_path / "bf16", tmp_path / "pruned"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    argv = ["prune", str(source), "--criterion", "ppl+", "--protect", "0", "--remove", "2",
            "--calibration", str(calibration_file), "--n-samples", "2", "--calib-seq-len", "16",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["secateurs", *argv])
    assert main(argv) == 0
    record = json.loads((out / "secateurs.json").read_text())
    assert record["criterion"]["name"] == "ppl+" and record["spec"]["criterion"] == "ppl+"
    assert record["argv"] == shlex.join(["secateurs", *argv])  # as typed
    assert record["command"].startswith(f"secateurs prune {source} --unit block --criterion ppl+")
    phases = ["load_s", "scoring_s", "cut_s", "write_s", "cpu_s", "peak_rss_mb"]
    assert list(record["timings"]) == phases
    assert all(record["timings"][k] >= 0 for k in phases)
    assert record["parameters"]["saved_dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    weights = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.bfloat16}


# --- threads ------------------------------------------------------------------------------------


def _cpus(monkeypatch, cores: int, idle_share: float) -> None:
    """A machine of ``cores`` CPUs that are idle ``idle_share`` of the time while sampled."""
    samples = iter([(0, 0), (int(1000 * idle_share), 1000)])
    monkeypatch.setattr(cli, "cpu_times", lambda: next(samples))
    monkeypatch.setattr(cli.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))


@pytest.mark.parametrize(
    ("cores", "idle_share", "threads"),
    [(2, 1.0, 2), (2, 0.92, 2), (2, 0.8, 1), (2, 0.5, 1), (2, 0.0, 1), (4, 0.65, 2), (4, 1, 4)],
)
def test_default_threads_are_the_idle_cores(monkeypatch, cores, idle_share, threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _cpus(monkeypatch, cores, idle_share)
    assert choose_threads(None) == threads


def test_threads_given_or_set_in_the_environment_win(monkeypatch):
    assert choose_threads(3) == 3
    with pytest.raises(ConfigError, match="at least 1"):
        choose_threads(0)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(None) is None  # the user's environment already says; torch reads it


def test_without_proc_stat_the_load_average_decides(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli, "cpu_times", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 1.0, 1.0))
    assert choose_threads(None) == 1  # 1.4 idle
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert choose_threads(None) == 1  # never 0


@pytest.mark.parametrize("argv", [["ls", "--threads", "3"], ["--threads", "3", "ls"]])
def test_threads_option_reaches_torch_before_it_is_imported(tmp_path, argv):
    code = (
        f"import os, sys; from secateurs.cli import main; main({argv!r}); "
        "print(os.environ['OMP_NUM_THREADS'], 'torch' in sys.modules); "
        "import torch; print(torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(Path(__file__).parents[1] / "src")
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    # what torch makes of OMP_NUM_THREADS=3 here (it caps it at the cores it sees)
    same = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "3"},
    )  # fmt: skip
    *_, environment, threads = run.stdout.strip().splitlines()
    assert environment == "3 False", run.stderr  # set before torch was imported
    assert threads == same.stdout.strip()
    assert "model aliases" in run.stdout  # the command itself still ran


def test_threads_below_one_is_a_clear_error(capsys):
    assert main(["eval", "generate", "x", "--threads", "0"]) == 2
    assert "--threads must be at least 1; got 0." in capsys.readouterr().err


# --- zero-shot noise ----------------------------------------------------------------------------


def test_harness_expected_warnings_are_dropped_and_real_ones_kept(caplog):
    caplog.set_level(logging.INFO)
    task_log = logging.getLogger("lm_eval.api.task")
    with harness_quieted():
        for text in EXPECTED_WARNINGS:
            task_log.warning("boolq: %s and more", text)
        task_log.info("Building contexts for boolq on rank 0...")
        task_log.warning("Context length exceeds the model's maximum; truncating")
    assert [r.getMessage() for r in caplog.records] == [
        "Context length exceeds the model's maximum; truncating"
    ]
    task_log.warning(EXPECTED_WARNINGS[0])  # outside a run: lm-eval's logging is untouched
    assert caplog.records[-1].getMessage() == EXPECTED_WARNINGS[0]
    assert not logging.getLogger("lm_eval").filters and not task_log.filters


@pytest.mark.parametrize("command", [["eval", "generate"], ["eval", "ppl"], ["eval", "zeroshot"]])
def test_a_damaged_results_file_is_reported_before_the_evaluation(
    dense_and_pruned, monkeypatch, capsys, command
):
    _, pruned = dense_and_pruned
    (pruned / "results.json").write_text("{damaged")
    monkeypatch.setattr("secateurs.models.load_model", _refuse_to_load)
    assert main([*command, str(pruned), "--save"]) == 2
    err = capsys.readouterr().err
    assert f"{pruned / 'results.json'} is not valid JSON" in err


def _refuse_to_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the damaged results.json was reported")
