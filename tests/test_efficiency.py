"""Efficiency: analytic MACs against torch's FLOP counter; the benchmark's protocol and output."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from secateurs.errors import ConfigError
from secateurs.evaluate.efficiency import (
    BenchConfig,
    Candidate,
    attention_macs,
    benchmark,
    config_macs_per_token,
    count_parameters,
    depth_plan,
    format_table,
    kind_of,
    linear_macs_per_token,
    random_config,
    weight_bytes,
)
from secateurs.plan import Plan
from secateurs.units import apply_plan
from tiny_models import tiny_model, tokens


def _flops(model, ids) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return counter.get_total_flops()


@pytest.mark.parametrize("removed", [(), (2, 4)])
def test_macs_match_flop_counter(removed):
    model = tiny_model("llama")  # eager attention: QKᵀ and AV are plain matmuls
    if removed:
        apply_plan(model, Plan(6, blocks=removed))
    length = 10
    analytic = config_macs_per_token(model.config)
    assert analytic == linear_macs_per_token(model)
    expected = 2 * (length * analytic + attention_macs(model.config, length, length))
    assert _flops(model, tokens(1, length)) == expected


def test_parameters_and_weight_memory_count_tied_weights_once():
    model = tiny_model("llama")  # tied embeddings
    unique = {id(p): p for p in model.parameters()}
    assert count_parameters(model) == sum(p.numel() for p in unique.values())
    assert weight_bytes(model) >= 4 * count_parameters(model)


def test_random_config_shapes_and_depth_plan():
    config = random_config("llama-7b")
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (4096, 32, 32000)
    assert 6.6e9 < config_macs_per_token(config) < 6.8e9  # ≈ parameters minus embeddings
    plan = depth_plan(30, 6)
    assert len(plan.blocks) == 6 and not set(plan.blocks) & {0, 1, 2, 3, 28, 29}
    with pytest.raises(ConfigError, match="No config"):
        random_config("llama-9000")


def test_kind_of_record():
    assert kind_of({}) == "dense"
    width_record = {"width_plan": {"num_layers": 2, "heads": [[0], []], "channels": [[], []]}}
    assert kind_of(width_record) == "width"
    assert kind_of({"plan": {"num_layers": 6, "blocks": [2], "protected": [0]}}) == "depth"
    assert kind_of({"plan": {"num_layers": 6, "blocks": [], "heads": {"0": [1]}}}) == "width"


def test_benchmark_interleaves_and_reports_medians():
    dense, pruned = tiny_model("llama"), tiny_model("llama")
    apply_plan(pruned, Plan(6, blocks=(1, 2, 3)))
    config = BenchConfig(batch_sizes=(1, 2), new_tokens=3, prompt_len=4, repeats=2, warmup=0)
    result = benchmark([Candidate("dense", dense), Candidate("d3", pruned, "depth")], config, False)
    assert result["protocol"]["new_tokens"] == 3 and result["protocol"]["device"] == "cpu"
    base, cut = result["models"]
    assert cut["ideal_speedup"] == pytest.approx(base["macs_per_token"] / cut["macs_per_token"])
    for model in result["models"]:
        for row in model["results"]:
            assert row["status"] == "ok" and len(row["latency_runs_s"]) == 2
            tokens_per_s = row["batch_size"] * 3 / row["latency_s"]
            assert row["throughput_tok_s"] == pytest.approx(tokens_per_s)
    assert all(r["speedup"] == 1.0 for r in base["results"])
    assert "| d3 | depth |" in format_table(result)
