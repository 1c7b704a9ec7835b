"""The lazy session (layers read from disk one at a time) under the one flow: the same scores
as in memory, each layer loaded once for every modified model, the head read in row blocks,
modified streams offloaded to files. Whole runs in every mode: ``tests/test_modes.py``.

Tolerance for scores: |layer by layer − in memory| ≤ 1e-5 · max|in memory| + 1e-9 per unit
kind (float32 compute, the same layer code on the same inputs; the head's NLL is read in row
blocks). ``mini-llm``: ≤ 1e-6 · max|in memory| for the gate gradients and the scores.
"""

from __future__ import annotations

import json

import pytest
import torch

from secateurs.adapters import adapter_for
from secateurs.cli import main
from secateurs.criteria import CRITERIA, ScoringContext
from secateurs.edits import Perturbation, Removal
from secateurs.errors import ConfigError, UnsupportedModelError
from secateurs.run import prune
from secateurs.session.flow import Flow, Streams
from secateurs.session.lazy import LazyModel, LazySession
from tiny_models import TINY_CONFIGS, scoring_context, tiny_model, tokens

LAYERWISE_TYPES = sorted(TINY_CONFIGS)  # MoE checkpoints stored expert by expert included
EAGER = "eager"  # the tiny models' attention (tests/tiny_models.py)

CASES = (
    ("magnitude", ("block", "heads", "channels")),
    ("activation", ("heads", "channels")),
    ("fluctuation", ("heads", "channels")),
    ("block-influence", ("block", "attn", "mlp")),
    ("ppl", ("block", "attn", "mlp")),
)


@pytest.fixture
def saved(tmp_path):
    def save(model_type: str):
        model = tiny_model(model_type)
        model.save_pretrained(tmp_path / model_type)
        return model, tmp_path / model_type

    return save


def _scores(criterion, ctx: ScoringContext, kind: str) -> torch.Tensor:
    if kind in ("heads", "channels"):
        return torch.cat([s.flatten() for s in criterion.score_width(ctx, kind)])
    return criterion.score(ctx, kind)


def _supported(model, criterion, kind: str) -> bool:
    adapter = adapter_for(model)
    if kind in ("heads", "channels"):
        try:
            adapter.width_layout(kind, model.config)
        except (ConfigError, UnsupportedModelError):
            return False
    return kind in criterion.units and (kind not in ("attn", "mlp") or kind in adapter.unit_kinds())


@pytest.mark.parametrize("model_type", LAYERWISE_TYPES)
def test_sequential_scores_equal_whole_model(model_type, saved):
    model, path = saved(model_type)
    calibration = tokens(4, 12)
    lazy = LazyModel(path, attn_implementation=EAGER)
    compared = 0
    for name, kinds in CASES:
        criterion = CRITERIA.get(name)()
        for kind in kinds:
            if not _supported(model, criterion, kind):
                continue
            whole = scoring_context(model, calibration, 2)
            layered = scoring_context(lazy, calibration, 2)
            expected, actual = _scores(criterion, whole, kind), _scores(criterion, layered, kind)
            tolerance = 1e-5 * float(expected.abs().max()) + 1e-9
            assert torch.allclose(actual, expected, rtol=0, atol=tolerance), (name, kind)
            compared += 1
    assert compared >= 7  # every depth unit kind at least, for every family


def test_layers_stay_on_disk_until_loaded(saved):
    model, path = saved("llama")
    lazy = LazyModel(path)
    on_meta = lambda module: all(p.is_meta for p in module.parameters())  # noqa: E731
    assert all(on_meta(layer) for layer in lazy.layers)
    assert lazy.model.get_input_embeddings().weight.is_meta
    assert not lazy.model.model.norm.weight.is_meta
    with lazy.loaded(3) as layer:
        assert not any(p.is_meta for p in layer.parameters())
        expected = model.model.layers[3].state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in layer.state_dict().items())
    assert on_meta(lazy.layers[3])


def test_head_nll_equals_the_model_loss(saved):
    """The head read in row blocks gives the whole model's next-token NLL."""
    model, path = saved("gemma2")  # final logit soft-capping applied per vocabulary block
    lazy = LazyModel(path, attn_implementation=EAGER)
    ids = tokens(2, 10)
    flow = Flow(LazySession(lazy, path / "spill"), ids, batch_size=2)
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss
    assert flow.mean_nll(flow.final()) == pytest.approx(float(expected), rel=1e-5)


def test_backward_criteria_are_refused_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="backward pass.*mini-llm, ppl"):
        prune(tmp_path / "absent", mode="sequential", criterion="taylor", remove=2,
              out=tmp_path / "out")  # fmt: skip


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.glob("*.safetensors")}


# --- the command line --------------------------------------------------------------------------
def _prune(model_dir, out, calibration_file, *flags) -> int:
    calib = ["--calibration", str(calibration_file), "--n-samples", "8", "--calib-seq-len", "16"]
    return main(["prune", str(model_dir), "--out", str(out), *calib, *flags])


@pytest.mark.parametrize(
    "flags",
    [
        ("--unit", "block", "--criterion", "ppl", "--remove", "2", "--protect", "none"),
        (
            "--unit",
            "width",
            "--criterion",
            "fluctuation",
            "--ratio",
            "0.3",
            "--reconstruct-samples",
            "8",
        ),
    ],
)
def test_cli_sequential_saves_what_the_in_memory_path_saves(
    flags, model_dir, calibration_file, tmp_path
):
    """Same command with and without --sequential: the same checkpoint, byte for byte."""
    assert _prune(model_dir, tmp_path / "memory", calibration_file, *flags) == 0
    assert _prune(model_dir, tmp_path / "layered", calibration_file, *flags, "--sequential") == 0
    record = json.loads((tmp_path / "layered" / "secateurs.json").read_text())
    assert record["session"]["name"] == "sequential"
    assert _files(tmp_path / "layered") == _files(tmp_path / "memory")


def test_max_memory_takes_the_sequential_path(model_dir, calibration_file, tmp_path, capsys):
    flags = ("--unit", "block", "--criterion", "block-influence", "--remove", "1")
    assert (
        _prune(model_dir, tmp_path / "auto", calibration_file, *flags, "--max-memory", "1e-6") == 0
    )
    assert "one layer at a time" in capsys.readouterr().out
    record = json.loads((tmp_path / "auto" / "secateurs.json").read_text())
    assert record["session"]["name"] == "sequential"


def test_cli_sequential_refuses_what_it_cannot_do(model_dir, tmp_path):
    flags = ("--unit", "block", "--criterion", "taylor", "--remove", "1", "--sequential")
    assert main(["prune", str(model_dir), "--out", str(tmp_path / "o"), *flags]) == 2
    flags = ("--unit", "experts", "--criterion", "magnitude", "--ratio", "0.5", "--sequential")
    assert main(["prune", str(model_dir), "--out", str(tmp_path / "o"), *flags]) == 2
    assert not (tmp_path / "o").exists()


def test_padding_token_outside_the_calibration_rows(tmp_path):
    """The compact input embedding holds only the calibration tokens' rows: a padding index
    into the full table (SmolLM2's) must not be applied to it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_models import TINY_CONFIGS, VOCAB

    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], "pad_token_id": VOCAB - 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=EAGER).eval()
    assert model.get_input_embeddings().padding_idx == VOCAB - 1
    model.save_pretrained(tmp_path / "model")
    calibration = tokens(4, 12) % (VOCAB // 2)  # never the padding token
    lazy = LazyModel(tmp_path / "model", attn_implementation=EAGER)
    ctx = scoring_context(model, calibration, 2)
    layered = scoring_context(lazy, calibration, 2)
    criterion = CRITERIA.get("block-influence")()
    torch.testing.assert_close(criterion.score(layered, "block"), criterion.score(ctx, "block"))
    assert lazy.model.get_input_embeddings().padding_idx == VOCAB - 1  # restored


def test_head_counts_transformers_refuses_are_saved_as_per_layer_widths(tmp_path):
    """Llama-3 shapes: 8 query heads of 4 dims in 4 KV groups over hidden 32; keeping 3 groups
    leaves 6 heads, and LlamaConfig refuses 32 % 6 != 0 even with an explicit head_dim. Both
    paths save the widths in secateurs.json with a marked config, and the reload is exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from secateurs.models import load_model
    from tiny_models import TINY_CONFIGS

    shape = dict(num_attention_heads=8, num_key_value_heads=4, head_dim=4)
    config = AutoConfig.for_model("llama", **{**TINY_CONFIGS["llama"], **shape})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=EAGER).eval()
    model.save_pretrained(tmp_path / "source")
    calibration = tokens(16, 12)
    options = dict(unit="heads", criterion="activation", ratio=0.08, calibration=calibration,
                   progress=False)  # fmt: skip
    memory = prune(tmp_path / "source", mode="memory", out=tmp_path / "memory", **options)
    assert memory.plan.kept("heads") == (3,) * len(memory.plan.kept("heads"))
    record = prune(tmp_path / "source", mode="sequential", out=tmp_path / "layered", **options)
    record = record.record
    for out in ("memory", "layered"):
        saved = json.loads((tmp_path / out / "secateurs.json").read_text())
        assert saved["structure"]["widths"]["heads"] == [6] * len(
            saved["structure"]["widths"]["heads"]
        )
        assert not saved["loading"]["plain_transformers"]
    assert _files(tmp_path / "layered") == _files(tmp_path / "memory")
    assert record["plan"] == memory.plan.to_dict()
    reloaded = load_model(tmp_path / "layered")[0].eval()
    ids = tokens(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, memory.model(ids).logits)


def test_ppl_streams_offloaded_to_files_give_the_same_scores(saved, tmp_path):
    _, path = saved("llama")
    calibration = tokens(4, 12)
    lazy = LazyModel(path, attn_implementation=EAGER)
    scores = {}
    for where in (None, tmp_path / "streams"):
        session = LazySession(lazy, tmp_path / "spill")
        ctx = ScoringContext(session, Flow(session, calibration, 2, offload=where), progress=False)
        scores[where] = CRITERIA.get("ppl")().score(ctx, "block")
    assert torch.equal(scores[None], scores[tmp_path / "streams"])  # files hold exact tensors
    assert list((tmp_path / "streams").iterdir()) == []  # removed after use


def test_streams_go_to_a_temporary_folder_when_memory_is_short(saved, tmp_path, monkeypatch):
    """Offloading is chosen by the estimate and changes nothing but where streams live."""
    model, path = saved("qwen2")
    calibration = tokens(8, 12)
    options = dict(unit="block", criterion="ppl", remove=2, protect="none", progress=False,
                   calibration=calibration, mode="sequential")  # fmt: skip
    prune(path, out=tmp_path / "roomy" / "out", **options)
    monkeypatch.setattr("secateurs.calibration.available_memory", lambda: 1024)
    chosen = []
    real = Flow.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        chosen.append(self.offload)

    monkeypatch.setattr(Flow, "__init__", spy)
    prune(path, out=tmp_path / "short" / "out", **options)
    assert chosen and chosen[0] is not None and chosen[0].parent == tmp_path / "short"
    assert not chosen[0].exists()  # the temporary folder is gone
    assert _files(tmp_path / "short" / "out") == _files(tmp_path / "roomy" / "out")


# --- perturbed models: ppl's removals and mini-llm's gates, every stream in lockstep ----------
def _on_meta(module) -> bool:
    return all(p.is_meta for p in module.parameters())


def _contexts(model, lazy, calibration):
    return scoring_context(model, calibration, 2), scoring_context(lazy, calibration, 2)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_perturbed_losses_agree_between_pipelines_and_load_each_layer_once(
    model_type, saved, monkeypatch
):
    """The same perturbed models (the base, a block skipped, a branch masked) give the same
    per-window losses in memory and layer by layer, where all streams share one load per
    layer."""
    model, path = saved(model_type)
    calibration = tokens(4, 12)
    lazy = LazyModel(path, attn_implementation=EAGER)
    whole, layered = _contexts(model, lazy, calibration)
    models = [Perturbation(0), Perturbation(1, {1: Removal("block")})]
    models += [Perturbation(2, {2: Removal("attn"), 3: Removal("mlp")})]
    loads, real = [], lazy.load_layer

    def load(index: int):
        resident = [i for i, layer in enumerate(lazy.layers) if not _on_meta(layer)]
        loads.append((index, resident))
        return real(index)

    monkeypatch.setattr(lazy, "load_layer", load)
    actual = layered.flow.losses(models)
    assert loads == [(i, []) for i in range(len(lazy.layers))]  # once each, one at a time
    expected = whole.flow.losses(models)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == (4,) and a.dtype == torch.float64
        torch.testing.assert_close(a, e, rtol=1e-6, atol=0)
    assert len({float(e.sum()) for e in expected}) == 3  # three different models
    with pytest.raises(ValueError, match="before the start"):
        Perturbation(2, {1: Removal("block")})


MINI_LLM_OPTIONS = (
    {},  # the defaults: scope="layer", 3 interleaved layers per pass, one-sided, K = 1
    {"antithetic": True, "num_perturbations": 2, "layers_per_pass": 2},
    {"scope": "model", "num_perturbations": 2},  # every layer's gates, streams from layer 0
)


@pytest.mark.parametrize("model_type", ["llama", "phi3", "gpt2", "opt", "qwen2"])
def test_sequential_mini_llm_equals_in_memory(model_type, saved):
    """Plain, fused (phi3), Conv1D (gpt2), biased (opt, qwen2) layouts: the same gate gradients
    and scores from streams advanced in lockstep as from in-memory passes, every option set."""
    model, path = saved(model_type)
    calibration = tokens(6, 12)
    lazy = LazyModel(path, attn_implementation=EAGER)
    criterion = CRITERIA.get("mini-llm")
    compared = 0
    for options in MINI_LLM_OPTIONS:
        for kind in ("heads", "channels"):
            if not _supported(model, criterion(), kind):
                continue
            whole, layered = _contexts(model, lazy, calibration)
            expected = _scores(criterion(**options), whole, kind)
            actual = _scores(criterion(**options), layered, kind)
            gates = [torch.tensor(c.extras["gate_gradients"][kind][2]) for c in (whole, layered)]
            assert gates[0].abs().max() > 0
            torch.testing.assert_close(gates[1], gates[0], rtol=0, atol=1e-6 * gates[0].abs().max())
            torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6 * expected.abs().max())
            compared += 1
    assert compared >= 3


def test_mini_llm_streams_offloaded_to_files_give_the_same_scores(saved, tmp_path, monkeypatch):
    """Offloaded streams change nothing; the streams held are the ones the offloading
    estimate counts (``stream_count``)."""
    _, path = saved("llama")
    calibration = tokens(4, 12)
    lazy = LazyModel(path, attn_implementation=EAGER)
    criterion = CRITERIA.get("mini-llm")(antithetic=True, layers_per_pass=2)
    held, real = [], Streams.__setitem__

    def spy(self, key, hidden):
        real(self, key, hidden)
        held.append(len(list(self)))

    monkeypatch.setattr(Streams, "__setitem__", spy)
    scores = []
    for where in (None, tmp_path / "streams"):
        session = LazySession(lazy, tmp_path / "spill")
        ctx = ScoringContext(session, Flow(session, calibration, 2, offload=where), progress=False)
        scores.append(_scores(criterion, ctx, "channels"))
    assert torch.equal(scores[0], scores[1])
    assert list((tmp_path / "streams").iterdir()) == []
    assert max(held) == criterion.stream_count(len(lazy.layers)) == 3 * 2  # 3 passes, ± pairs


@pytest.mark.parametrize(
    "options", [(), ("--option", "scope=model", "--option", "antithetic=true")]
)
def test_cli_sequential_mini_llm_saves_what_the_in_memory_path_saves(
    options, model_dir, calibration_file, tmp_path
):
    flags = ("--unit", "width", "--criterion", "mini-llm", "--ratio", "0.3", *options)
    flags += ("--reconstruct-samples", "8", "--batch-size", "8")
    assert _prune(model_dir, tmp_path / "memory", calibration_file, *flags) == 0
    assert _prune(model_dir, tmp_path / "layered", calibration_file, *flags, "--sequential") == 0
    records = [
        json.loads((tmp_path / d / "secateurs.json").read_text()) for d in ("memory", "layered")
    ]
    assert records[1]["session"]["name"] == "sequential"
    assert records[1]["criterion"]["options"] == records[0]["criterion"]["options"]
    assert records[1]["plan"] == records[0]["plan"]
    assert _files(tmp_path / "layered") == _files(tmp_path / "memory")
