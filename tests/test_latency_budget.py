"""``--unit auto --latency F``: the joint search under a latency budget, on a synthetic table.

- the goal's arithmetic is the table's: a genome's predicted time is the base plus each layer's
  terms, the dense genome removes nothing, the amount is (1 - F) × the dense time;
- genomes llama.cpp cannot serve (first kept layer without attention) never meet the goal;
- the evolution keeps a latency budget, and spends it where the table says time is cheap;
- a pruned model's record carries the engine, the table's provenance and the predicted speeds,
  which the written checkpoint's own layers reproduce;
- bad option combinations are refused before any model is read, naming the option.

No llama.cpp timing here: the tables are built by hand.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from secateurs.cli import main
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.evolve import MLP_STEPS, Evolution, evolve, space_of
from secateurs.export.layout import read_layout
from secateurs.latency import LatencyTable, LlamaCpp, ModelShape, TableKey, layout_layers, predict
from secateurs.latency import budget as latency_budget
from secateurs.latency.budget import (
    LatencyBudget,
    compare_measured,
    genome_layers,
    latency_goal,
    recorded_table,
)
from secateurs.latency.engines import Speed
from secateurs.latency.measure import save_table
from secateurs.latency.table import BASE, STUB
from secateurs.run import prune
from secateurs.session.resident import ResidentSession
from tiny_models import TINY_CONFIGS, tiny_model, tiny_tokenizer, tokens

CALIBRATION = tokens(24, 12, seed=4)
AUTO = dict(unit="auto", generations=6, judge_samples=6, reconstruct_samples=12)
# seconds per token of each term: attention dear for its parameters (a KV group saves 6× the
# time of as many parameters of MLP channels), MLP time linear in its width, a stub for an
# MLP-less layer
DECODE = {BASE: 1e-3, "attn:1": 2e-4, "attn:2": 4e-4, STUB: 1e-5}
PROMPT = {BASE: 2e-4, "attn:1": 6e-5, "attn:2": 9e-5, STUB: 2e-6}


def _shape() -> ModelShape:
    return ModelShape.from_config(TINY_CONFIGS["llama"] | {"model_type": "llama"})


def _table(shape: ModelShape | None = None) -> LatencyTable:
    shape = shape or _shape()
    widths = [shape.intermediate_size * k // MLP_STEPS for k in range(1, MLP_STEPS + 1)]
    decode = DECODE | {f"mlp:{c}": 2e-6 * c for c in widths}
    prompt = PROMPT | {f"mlp:{c}": 5e-7 * c for c in widths}
    key = TableKey(shape, "llama.cpp", "test-build", "f16", 1, "test machine", 512, 128)
    return LatencyTable(key, {"decode": decode, "prompt": prompt}, info={"seconds": 1.0})


def _space():
    model = tiny_model("llama")
    return space_of(model, ResidentSession(model).adapter)


def _by_hand(table: LatencyTable, genome, metric: str = "decode") -> float:
    """The additive model written out: base + each layer's attention, MLP (or stub) terms."""
    costs, channels = table.costs[metric], table.key.shape.intermediate_size
    total = costs[BASE]
    for kv, eighths in genome:
        kept = channels * eighths // MLP_STEPS
        total += (costs[f"attn:{kv}"] if kv else 0.0) + (
            costs[f"mlp:{kept}"] if kept else (costs[STUB] if kv else 0.0)
        )
    return total


def _random_genomes(space, count: int, seed: int = 0):
    rng = random.Random(seed)
    for _ in range(count):
        yield tuple(
            (rng.randrange(space.kv + 1), rng.randrange(MLP_STEPS + 1))
            for _ in range(space.num_layers)
        )


# --- the goal's arithmetic ----------------------------------------------------------------------
def test_the_goal_is_dense_time_minus_the_genomes_predicted_time():
    space, table = _space(), _table()
    goal = latency_goal(space, 0.7, table)
    dense = _by_hand(table, space.dense())
    assert goal.removed(space.dense()) == 0.0
    assert goal.amount == pytest.approx(0.3 * dense, rel=1e-12)
    assert "decode" in goal.unit and "llama.cpp" in goal.unit
    for genome in _random_genomes(space, 50):
        seconds = predict(table, genome_layers(space, genome))
        assert seconds == pytest.approx(_by_hand(table, genome), rel=1e-12, abs=0)
        assert goal.removed(genome) == pytest.approx(dense - seconds, rel=1e-12, abs=1e-15)
    # a removed block costs nothing: every block removed leaves only the base
    assert goal.removed(((0, 0),) * space.num_layers) == pytest.approx(dense - DECODE[BASE])


def test_the_prompt_metric_uses_the_prompt_costs():
    space, table = _space(), _table()
    budget = LatencyBudget(space, table, 0.5, metric="prompt")
    genome = next(_random_genomes(space, 1, seed=3))
    assert budget.seconds(genome) == pytest.approx(_by_hand(table, genome, "prompt"), rel=1e-12)
    assert budget.goal().amount == pytest.approx(0.5 * _by_hand(table, space.dense(), "prompt"))


def test_genomes_llama_cpp_cannot_serve_never_meet_the_goal():
    space, table = _space(), _table()
    goal = latency_goal(space, 0.9, table, engine=LlamaCpp())
    n, full = space.num_layers, (space.kv, MLP_STEPS)
    no_first_attention = ((0, MLP_STEPS), *(full,) * (n - 1))
    first_block_gone_second_has_none = ((0, 0), (0, MLP_STEPS), *(full,) * (n - 2))
    first_block_gone = ((0, 0), *(full,) * (n - 1))
    assert goal.removed(no_first_attention) == -math.inf
    assert goal.removed(first_block_gone_second_has_none) == -math.inf
    saved = _by_hand(table, space.dense()) - _by_hand(table, first_block_gone)
    assert goal.removed(first_block_gone) == pytest.approx(saved)
    assert goal.removed(((0, 0),) * n) == -math.inf  # nothing left to serve
    # without an engine every genome is priced
    assert latency_goal(space, 0.9, table).removed(no_first_attention) > 0


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.2])
def test_a_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ConfigError, match=r"--latency .*\(0, 1\)"):
        latency_goal(_space(), fraction, _table())


def test_a_budget_below_every_start_is_refused_with_the_fastest_start():
    space, table = _space(), _table()
    fastest = _by_hand(table, ((1, 0),) * space.num_layers) / _by_hand(table, space.dense())
    with pytest.raises(ConfigError, match=f"below what the search can start from.*{fastest:.3f}×"):
        latency_goal(space, 0.95 * fastest, table, engine=LlamaCpp())
    latency_goal(space, 1.01 * fastest, table, engine=LlamaCpp())  # reachable: accepted


def test_a_table_for_another_shape_is_refused():
    other = ModelShape.from_config(TINY_CONFIGS["llama"] | {"intermediate_size": 128})
    with pytest.raises(ConfigError, match="128 MLP channels; the model has .* 64"):
        latency_goal(_space(), 0.7, _table(other))


def test_a_key_stored_before_a_field_existed_keeps_what_it_was_measured_with():
    stored = json.loads(json.dumps(_table().to_dict()))
    for name in ("statistic", "method", "clock"):
        del stored["key"][name]
    key = LatencyTable.from_dict(stored).key
    assert (key.statistic, key.method, key.clock) == ("median", 1, "wall")


# --- the evolution --------------------------------------------------------------------------------
class _Separable:
    """A fake judge: each layer's loss grows with the levels it lost, weighted per layer."""

    def __init__(self, space, weights, mlp: float = 0.25) -> None:
        self.space, self.weights, self.mlp = space, weights, mlp
        self.parent, self.evaluations = space.dense(), 0

    def adopt(self, genome) -> None:
        self.parent = genome

    def __call__(self, genome, batches=None) -> float:
        self.evaluations += 1
        return sum(
            w * ((self.space.kv - kv) ** 2 + self.mlp * (MLP_STEPS - e) ** 2)
            for w, (kv, e) in zip(self.weights, genome, strict=True)
        )


def test_the_evolution_keeps_a_latency_budget():
    space, table = _space(), _table()
    budget = LatencyBudget(space, table, 0.75, engine=LlamaCpp())
    goal = budget.goal()
    judge = _Separable(space, [1.0, 5.0, 0.2, 0.2, 5.0, 1.0])  # cheap layers: 2 and 3
    found = evolve(judge, space, goal, Evolution(generations=60, seed=1))
    genome = found["genome"]
    kls = [step["kl"] for step in found["history"]]
    assert all(b <= a for a, b in zip(kls, kls[1:], strict=False)) and kls[-1] < kls[0]
    assert goal.removed(genome) >= goal.amount  # the budget is met, never undershot
    assert budget.seconds(genome) <= 0.75 * budget.dense_seconds() + 0.01 * goal.amount
    assert genome[0][0] > 0  # llama.cpp serves it
    cut = [space.kv - kv + MLP_STEPS - e for kv, e in genome]
    assert cut[2] + cut[3] > cut[1] + cut[4], genome  # the cheap layers give the most


def test_a_latency_budget_is_not_a_parameter_budget():
    """A judge that would rather lose MLP channels than attention, under the latency budget and
    under the parameter count the latency result removes: MLP channels save little time in the
    table, so only the latency search gives up attention."""
    space, table = _space(), _table()
    settings = Evolution(generations=80, seed=2)
    judge = _Separable(space, [1.0] * space.num_layers, mlp=0.05)
    by_time = evolve(judge, space, latency_goal(space, 0.7, table), settings)["genome"]
    params = space.removed(by_time)
    judge = _Separable(space, [1.0] * space.num_layers, mlp=0.05)
    by_params = evolve(judge, space, space.parameters(params), settings)
    attention_lost = [sum(space.kv - kv for kv, _ in g) for g in (by_time, by_params["genome"])]
    assert attention_lost[0] > attention_lost[1], (by_time, by_params["genome"])


# --- through prune: the record ----------------------------------------------------------------
@pytest.fixture
def source(tmp_path):
    path = tmp_path / "llama"
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_the_record_carries_the_table_and_the_written_models_prediction(source, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    table = _table()
    monkeypatch.setattr(latency_budget, "engine_table", lambda config, engine: table)
    out = tmp_path / "out"
    prune(source, latency=0.8, engine="llama-cpp", calibration=CALIBRATION, out=out,
          progress=False, **AUTO)  # fmt: skip
    record = json.loads((out / "secateurs.json").read_text())
    assert record["spec"]["latency"] == 0.8 and record["spec"]["engine"] == "llama.cpp"
    search = record["search"]
    latency = search["latency"]
    assert (latency["engine"], latency["metric"]) == ("llama.cpp", "decode")
    assert latency["table"]["digest"] == table.key.digest()
    assert latency["table"]["key"]["engine_version"] == "test-build"
    dense = _by_hand(table, ((2, MLP_STEPS),) * 6)
    assert latency["predicted"]["dense"]["decode_s"] == pytest.approx(dense)
    assert latency["budget_seconds"] == pytest.approx(0.2 * dense)
    assert search["budget"]["value"] == pytest.approx(0.2 * dense)
    assert search["budget"]["removed"] >= 0.99 * search["budget"]["value"]
    # the written checkpoint's own layers give the recorded prediction
    layers = layout_layers(read_layout(out), table.key.shape)
    for metric in ("decode", "prompt"):
        pruned = latency["predicted"]["pruned"]
        assert predict(table, layers, metric) == pytest.approx(pruned[f"{metric}_s"], rel=1e-12)
        assert pruned[f"{metric}_tps"] == pytest.approx(1 / pruned[f"{metric}_s"])
    assert predict(table, layers) <= 0.8 * dense + 0.01 * 0.2 * dense
    assert [[v.kv_groups, v.channels] for v in layers] == [
        [entry["kv_groups"], entry["mlp_channels"]] for entry in search["layers"]
    ]
    # the end-to-end check finds the run's table by the key its record keeps
    monkeypatch.setenv("SECATEURS_LATENCY_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=f"table {table.key.digest()} .* not in the cache"):
        recorded_table(out)
    save_table(table)
    assert recorded_table(out) == table
    with pytest.raises(ConfigError, match="not pruned under a latency budget"):
        recorded_table(source)


def test_the_check_compares_measured_with_predicted_speed():
    space, table = _space(), _table()
    genome = ((2, 8), (1, 4), (0, 8), (0, 0), (2, 0), (1, 8))
    layers = genome_layers(space, genome)
    dense_s = {m: _by_hand(table, space.dense(), m) for m in ("decode", "prompt")}
    pruned_s = {m: _by_hand(table, genome, m) for m in ("decode", "prompt")}
    # measured: the dense model 10% slower than its table, the pruned one 20% slower
    dense = Speed(1.1 * dense_s["decode"], 1.1 * dense_s["prompt"], {}, 6, 0.9)
    speed = Speed(1.2 * pruned_s["decode"], 1.2 * pruned_s["prompt"], {}, 6, 0.8)
    result = compare_measured(table, layers, speed, dense)
    assert result["layers"][3] == [0, 0] and result["cpu_share"] == 0.8
    for metric in ("decode", "prompt"):
        row = result[metric]
        assert row["predicted_tps"] == pytest.approx(1 / pruned_s[metric])
        assert row["measured_tps"] == pytest.approx(1 / (1.2 * pruned_s[metric]))
        assert row["error"] == pytest.approx(1 / 1.2 - 1)
        assert row["predicted_ratio"] == pytest.approx(pruned_s[metric] / dense_s[metric])
        assert row["measured_ratio"] == pytest.approx(1.2 / 1.1 * row["predicted_ratio"])


def test_a_model_the_engine_cannot_serve_is_refused_from_its_config(tmp_path, monkeypatch):
    path = tmp_path / "opt"
    tiny_model("opt").save_pretrained(path)  # the weight files are checked first

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read before the config refused the run")

    monkeypatch.setattr("secateurs.reload.load_checkpoint", refuse)
    with pytest.raises(UnsupportedModelError, match="--latency .*llama.cpp.*'opt'"):
        prune(path, unit="auto", latency=0.7, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- refusals before any model is read ------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--unit", "auto", "--latency", "1.5"], "--latency is a fraction .* in \\(0, 1\\)"),
        (["--unit", "auto", "--latency", "0"], "--latency is a fraction"),
        (["--unit", "width", "--latency", "0.7"], "--latency applies to --unit auto only"),
        (["--latency", "0.7"], "--latency applies to --unit auto only; --unit is block"),
        (["--unit", "auto", "--latency", "0.7", "--engine", "vllm"],
         "--engine: Unknown latency engine 'vllm'.*Known: llama.cpp"),
        (["--unit", "auto", "--ratio", "0.2", "--engine", "llama.cpp"], "--engine names"),
        (["--unit", "auto", "--latency", "0.7", "--include-embeddings"], "--include-embeddings"),
    ],
)  # fmt: skip
def test_bad_latency_options_are_refused_before_loading(flags, message, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(tmp_path / "never-read"), *flags, "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err
    assert not out.exists()


def test_latency_and_ratio_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):  # argparse: one amount
        main(["prune", str(tmp_path), "--unit", "auto", "--latency", "0.7", "--ratio", "0.2"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Give one of --ratio, --remove, --params or --latency"):
        prune(tmp_path / "never-read", unit="auto", latency=0.7, ratio=0.2, out=tmp_path / "o")
