"""The model card (README.md) of every unit kind and mode: its front matter parses as YAML with
the Hub's keys, every number in it is one that secateurs.json / results.json hold (or follows
from them), its tables parse back to the record's plan, and it follows results.json."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from secateurs.card import CARD_FILE, MARK, render_card, write_card
from secateurs.checkpoint import read_record
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.plan import Plan
from secateurs.report import read_results, save_results
from tiny_models import tiny_model, tiny_tokenizer, word_text

TINY = ["--calibration", "CALIB", "--n-samples", "4", "--calib-seq-len", "16"]
# name -> (source model, prune flags, unit-kind tags the card must carry)
RUNS = {
    "block": ("llama", ["--criterion", "magnitude", "--remove", "2"], {"depth", "block"}),
    "attn": (
        "llama",
        ["--unit", "attn", "--criterion", "block-influence", "--remove", "2"],
        {"depth", "attn"},
    ),
    "mlp": (
        "llama",
        ["--unit", "mlp", "--criterion", "magnitude", "--remove", "2"],
        {"depth", "mlp"},
    ),
    "subblock": ("llama", ["--unit", "subblock", "--criterion", "ppl", "--remove", "3"], {"depth"}),
    "heal": (
        "llama",
        ["--criterion", "ppl", "--remove", "2", "--iterative", "--heal", "--heal-samples", "4"],
        {"depth", "block"},
    ),
    "heads": (
        "llama",
        ["--unit", "heads", "--criterion", "magnitude", "--ratio", "0.3", "--no-reconstruct"],
        {"width", "heads"},
    ),
    "channels": (
        "llama",
        [
            "--unit",
            "channels",
            "--criterion",
            "activation",
            "--ratio",
            "0.3",
            "--allocation",
            "global",
            "--reconstruct-samples",
            "4",
        ],
        {"width", "channels"},
    ),
    "width": (
        "llama",
        [
            "--unit",
            "width",
            "--criterion",
            "fluctuation",
            "--ratio",
            "0.2",
            "--reconstruct-samples",
            "4",
        ],
        {"width", "channels"},
    ),
    "block-width": (
        "llama",
        [
            "--unit",
            "block,width",
            "--criterion",
            "block-influence,magnitude",
            "--ratio",
            "0.4",
            "--depth-share",
            "0.5",
            "--reconstruct-samples",
            "4",
        ],
        {"depth", "block", "width", "heads"},
    ),
    "experts": (
        "qwen2_moe",
        ["--unit", "experts", "--criterion", "reap", "--ratio", "0.25", "--allocation", "global"],
        {"experts"},
    ),
    "experts-uniform": (
        "mixtral",
        ["--unit", "experts", "--criterion", "frequency", "--remove", "2"],
        {"experts"},
    ),
    "sequential": (
        "llama",
        ["--criterion", "block-influence", "--remove", "2", "--sequential"],
        {"depth", "block"},
    ),
    "sequential-width": (
        "llama",
        [
            "--unit",
            "width",
            "--criterion",
            "magnitude",
            "--ratio",
            "0.2",
            "--sequential",
            "--reconstruct-samples",
            "4",
        ],
        {"width"},
    ),
    "streamed": ("llama", ["--blocks", "1,2", "--stream"], {"depth", "block"}),
}
NUMBER = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    """Every kind of run, pruned by the CLI from tiny models saved as local checkpoints."""
    root = tmp_path_factory.mktemp("cards")
    tokenizer = tiny_tokenizer()
    for family in ("llama", "qwen2_moe", "mixtral"):
        tiny_model(family).save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(word_text(60, seed=s) for s in range(12)))
    flags = [str(calib) if f == "CALIB" else f for f in TINY]
    out = {}
    for name, (family, args, _) in RUNS.items():
        assert main(["prune", str(root / family), *args, "--out", str(root / name), *flags]) == 0
        out[name] = root / name
    return out


# --- parsing a card back ------------------------------------------------------------------------


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def table(card: str, header: str) -> list[list[str]]:
    """The body rows (cells) of the markdown table whose header row starts with ``header``."""
    lines = card.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def number(text: str) -> float:
    return float(text.replace(",", "").replace("*", ""))


def layers_of(span: str) -> range:
    first, _, last = span.partition("–")
    return range(int(first), int(last or first) + 1)


def per_layer(rows: list[list[str]], column: int) -> dict[int, str]:
    return {layer: row[column] for row in rows for layer in layers_of(row[0])}


# --- what may appear --------------------------------------------------------------------------


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


def _variants(value: float) -> set[str]:
    out = {str(value)}
    if isinstance(value, int):
        out.add(str(value))
    for digits in (1, 2, 3, 4):
        out |= {f"{value:.{digits}f}", f"{100 * value:.{digits}f}"}
    return out


def allowed_numbers(record: dict, results: dict, name: str) -> set[str]:
    """Numbers the card may print: the files' own (every literal in them, and each value at the
    precisions the card uses), and what follows from them, computed here independently."""
    text = json.dumps(record) + json.dumps(results) + name
    allowed = set(NUMBER.findall(text))
    for value in [*_leaves(record), *_leaves(results)]:
        allowed |= _variants(value)
    plan = Plan.of_record(record)
    derived = set(range(plan.num_layers + 1)) | {len(plan.blocks), len(plan.attn), len(plan.mlp)}
    for kind in ("heads", "channels", "experts"):
        removed = plan.removed(kind)
        derived |= set(plan.kept(kind)) | {sum(map(len, removed)), sum(1 for r in removed if r)}
    params = record["parameters"]
    derived.add(params["before"] - params["after"])
    allowed |= {str(v) for v in derived}
    allowed |= _variants((params["before"] - params["after"]) / params["before"])
    # the alias's hub id and file name (SmolLM2-135M-Instruct.Q4_1), versions in the text
    return allowed | {"2", "135", "4", "1"}


def assert_only_recorded_numbers(card: str, record: dict, results: dict, name: str) -> None:
    body = card.split(MARK, 1)[1]
    allowed = {a.replace(",", "") for a in allowed_numbers(record, results, name)}
    foreign = [n for n in NUMBER.findall(body) if n.replace(",", "") not in allowed]
    assert not foreign, f"numbers in the card that no file holds: {foreign}"


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RUNS))
def test_card_of_every_unit_kind(outputs, name):
    directory = outputs[name]
    record = read_record(directory)
    assert write_card(directory) == directory / CARD_FILE
    card = (directory / CARD_FILE).read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert "base_model" not in meta  # a local source has no hub id
    assert {"pruned", "secateurs", *RUNS[name][2]} <= set(meta["tags"])
    assert set(record["units"]) <= set(meta["tags"])
    _check_parameters(card, record["parameters"])
    plan = Plan.of_record(record)
    _check_removed(card, plan)
    _check_loading(card, record, name)
    assert _command_text(record["command"]) in card  # the command that made it, as recorded
    assert_only_recorded_numbers(card, record, {}, name)


def _command_text(command) -> str:
    return command if isinstance(command, str) else shlex.join(command)


def _check_parameters(card: str, params: dict) -> None:
    rows = dict((r[0], number(r[1])) for r in table(card, "| | parameters |"))
    assert rows["before"] == params["before"] and rows["after"] == params["after"]
    assert rows["removed"] == params["before"] - params["after"]
    if "removed_by_depth" in params:
        assert rows["removed by depth"] == params["removed_by_depth"]
        assert rows["removed by width"] == params["removed_by_width"]


def _check_removed(card: str, plan: Plan) -> None:
    if plan.has_depth:
        rows = {r[0].split(" ")[0]: r for r in table(card, "| removed | layers")}
        for key, words in (("blocks", "blocks"), ("attn", "attention"), ("mlp", "MLP")):
            expected = list(getattr(plan, key))
            got = [int(i) for i in rows[words][1].split(", ")] if words in rows else []
            assert got == expected
            assert int(rows[words][2]) == len(expected) if expected else words not in rows
    if plan.has_widths:
        rows = table(card, "| layers | KV head groups kept")
        for column, kind in ((1, "heads"), (2, "channels")):
            cells = per_layer(rows, column)
            assert sorted(cells) == list(range(plan.num_layers))
            for layer, cell in cells.items():
                assert cell == _expected_width_cell(plan, kind, layer)
    if plan.has_experts:
        cells = per_layer(table(card, "| layers | routed experts kept"), 1)
        for layer, cell in cells.items():
            kept, total = (int(x) for x in cell.split(" / "))
            assert total == plan.num_experts[layer]
            assert kept == plan.num_experts[layer] - len(plan.experts[layer])


def _expected_width_cell(plan: Plan, kind: str, layer: int) -> str:
    if layer in plan.blocks:
        return "removed (block)"
    total = getattr(plan, f"num_{kind}")[layer]
    if not total:
        return "all"
    return f"{plan.kept(kind)[layer]:,} / {total:,}"


def _check_loading(card: str, record: dict, name: str) -> None:
    plain = record["loading"]["plain_transformers"]
    assert ("AutoModelForCausalLM.from_pretrained" in card) is plain
    assert (f'secateurs.load_model("{name}")' in card) is not plain
    for kind, entry in record["engines"].items():
        row = next(r for r in table(card, "| export |") if f"--to {kind} " in r[0])
        expected = ", ".join(entry["engines"]) if entry["expressible"] else entry["why"]
        assert expected in row[1]


def _results(dataset_ppl: float) -> dict:
    protocol = {"dataset": "wikitext2", "split": "test", "seq_len": 128, "bos": "stream"}
    return {
        "ppl": {
            "wikitext2": {"ppl": dataset_ppl, "windows": 64, "tokens": 8192, "protocol": protocol}
        },
        "zeroshot": {
            "scores": {"boolq": 0.61234, "piqa": 0.70111, "lambada_openai": 0.3321},
            "metrics": {"lambada_openai": {"acc": 0.3321, "perplexity": 40.1234}},
            "samples": {"boolq": 100, "piqa": 100, "lambada_openai": 100},
            "mean": 0.54855,
            "protocol": {
                "limit": 100,
                "source": "local:/data",
                "metric": {"boolq": "acc", "piqa": "acc", "lambada_openai": "acc"},
            },
        },
    }


@pytest.mark.parametrize("name", ["block", "block-width", "experts", "sequential-width"])
def test_measured_results_parse_back(outputs, name):
    record = read_record(outputs[name])
    results = _results(152.2345)
    results["dense"] = {"model": "dense-model", "ppl": {"wikitext2": {"ppl": 63.8123}}}
    card = render_card(record, results, name)
    row = table(card, "| dataset | PPL |")[0]
    assert row[0] == "wikitext2"
    assert number(row[1]) == round(152.2345, 2) and number(row[2]) == round(63.8123, 2)
    assert (number(row[3]), number(row[4])) == (64, 8192)
    zs = {(r[0], r[1]): r[2] for r in table(card, "| task | metric | value |")}
    for task, value in results["zeroshot"]["scores"].items():
        assert number(zs[(task, "acc")]) == round(value, 4)
    assert number(zs[("lambada_openai", "perplexity")]) == round(40.1234, 2)
    assert number(zs[("**mean**", "")]) == round(0.54855, 4)
    assert_only_recorded_numbers(card, record, results, name)


def test_card_follows_results_json(outputs, tmp_path):
    directory = outputs["width"]
    card = directory / CARD_FILE
    save_results(directory, "ppl", _results(152.2345)["ppl"])
    first = card.read_text()
    assert "152.23" in first
    save_results(directory, "ppl", _results(98.7654)["ppl"])  # a later eval --save
    second = card.read_text()
    assert "98.77" in second and "152.23" not in second
    assert_only_recorded_numbers(second, read_record(directory), read_results(directory), "width")


def test_eval_commands_with_save_rewrite_the_card(outputs, data_dir, capsys):
    directory = outputs["heal"]
    args = ["eval", "ppl", str(directory), "--dataset", "wikitext2", "--max-windows", "2"]
    assert main([*args, "--seq-len", "16", "--data-dir", str(data_dir), "--save"]) == 0
    ppl = read_results(directory)["ppl"]["wikitext2"]["ppl"]
    row = table((directory / CARD_FILE).read_text(), "| dataset | PPL |")[0]
    assert number(row[1]) == round(ppl, 2)
    assert main(["eval", "generate", str(directory), "--new-tokens", "4", "--save"]) == 0
    generations = read_results(directory)["generations"]["generations"]
    rows = table((directory / CARD_FILE).read_text(), "| prompt |")
    assert [r[0] for r in rows] == [g["prompt"] for g in generations]
    assert [r[1] for r in rows] == [" ".join(g["text"].split()) or "(nothing)" for g in generations]


def test_alias_and_hub_sources_give_base_model(outputs):
    record = read_record(outputs["block"])
    alias = front_matter(render_card({**record, "source_model": "smollm2-135m"}))
    assert alias["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = render_card({**record, "source_model": "smollm2-135m"})
    assert "Q4_1 GGUF" in card
    hub = front_matter(render_card({**record, "source_model": "meta-llama/Llama-3.2-1B"}))
    assert hub["base_model"] == "meta-llama/Llama-3.2-1B"


def test_command_and_spec_are_shown_when_recorded(outputs):
    record = read_record(outputs["block"])
    command = ["secateurs", "prune", "smollm2-135m", "--remove", "2", "--out", "runs/my dir"]
    spec = {"unit": "block", "criterion": "magnitude", "remove": 2}
    card = render_card({**record, "command": command, "spec": spec})
    assert "secateurs prune smollm2-135m --remove 2 --out 'runs/my dir'" in card
    block = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == spec
    assert "holds no command line" not in card


def test_a_card_written_by_a_person_is_kept(outputs, caplog):
    directory = outputs["mlp"]
    (directory / CARD_FILE).write_text("# My notes\n")
    assert write_card(directory) is None
    assert (directory / CARD_FILE).read_text() == "# My notes\n"
    assert "not written by secateurs" in caplog.text


def test_no_record_or_a_damaged_one_is_a_clear_error(tmp_path, outputs):
    with pytest.raises(ConfigError, match="has no secateurs.json"):
        write_card(tmp_path)
    directory = outputs["attn"]
    (directory / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="results.json is not valid JSON"):
        write_card(directory)
    (directory / "results.json").unlink()


def test_bench_save_puts_speed_in_the_card(outputs):
    dense, pruned = outputs["block"].parent / "llama", outputs["streamed"]
    flags = ["--batch-sizes", "1,2", "--new-tokens", "2", "--prompt-len", "4", "--repeats", "1"]
    assert main(["bench", str(dense), str(pruned), *flags, "--warmup", "0", "--save"]) == 0
    speed = read_results(pruned)["speed"]
    assert speed["model"]["source"] == str(pruned) and speed["model"]["baseline"] == "llama"
    rows = table((pruned / CARD_FILE).read_text(), "| batch | latency (s)")
    for row, measured in zip(rows, speed["model"]["results"], strict=True):
        assert int(row[0]) == measured["batch_size"]
        assert number(row[1]) == round(measured["latency_s"], 3)
        assert number(row[2]) == round(measured["throughput_tok_s"], 1)
        assert number(row[3]) == round(measured["speedup"], 2)
    card = (pruned / CARD_FILE).read_text()
    assert_only_recorded_numbers(card, read_record(pruned), read_results(pruned), "streamed")
    # a model directory that secateurs did not write gets its results, never a card
    assert "speed" in read_results(dense) and not (dense / CARD_FILE).exists()


def test_a_recovered_model_says_it_was_retrained(outputs):
    record = read_record(outputs["width"])
    recovery = {
        "method": "lora",
        "data": {"source": "c4", "documents": 900},
        "teacher": None,
        "tokens_seen": 200_000,
    }
    card = render_card({**record, "recovery": recovery}, name="width")
    assert "then retrained (see Recovery)" in card and "not retrained" not in card
    assert "Retrained after pruning: `lora` on `c4`, 200,000 tokens." in card
    assert "not retrained" in render_card(record, name="width")


def test_healing_names_each_span_and_its_fit(outputs):
    record = read_record(outputs["heal"])
    run = record["healing"]["runs"][0]
    first, last = run["blocks"]
    card = render_card(record, name="heal")
    assert (
        f"blocks {first}–{last} replaced by a linear correction folded into layer "
        f"{run['into_layer']}; squared error on the calibration windows "
        f"{run['error_before']:,.4f} → {run['error_after']:,.4f}"
    ) in card
    skipped = {"blocks": [0, 0], "into_layer": -1, "skipped": "no kept MLP output projection"}
    healing = {**record["healing"], "runs": [skipped]}
    assert "block 0 not healed (no kept MLP output projection)" in render_card(
        {**record, "healing": healing}
    )


def test_results_are_saved_even_where_no_card_can_be_written(tmp_path, caplog):
    (tmp_path / "secateurs.json").write_text(json.dumps({"source_model": "x"}))  # no plan
    save_results(tmp_path, "ppl", {"wikitext2": 12.5})
    assert read_results(tmp_path) == {"ppl": {"wikitext2": 12.5}}
    assert not (tmp_path / CARD_FILE).exists()
    assert "Model card of" in caplog.text and "has no plan" in caplog.text


def test_a_card_written_in_a_temporary_directory_carries_the_final_name(outputs, tmp_path):
    from secateurs.outputs import atomic_directory

    record = (outputs["block"] / "secateurs.json").read_text()
    with atomic_directory(tmp_path / "runs-d6") as tmp:  # as the checkpoint writer will
        (tmp / "secateurs.json").write_text(record)
        write_card(tmp, name="runs-d6")
    card = (tmp_path / "runs-d6" / CARD_FILE).read_text()
    assert "\n# runs-d6\n" in card and ".partial-" not in card
