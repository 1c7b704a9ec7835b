"""Recovery under ``accelerate launch`` with 2 CPU processes (DDP over gloo), as users run it.

Two processes with a per-process batch B see, at every optimizer step, the same 2·B blocks as
one process with batch B and 2 gradient-accumulation steps (accelerate shards consecutive
batches of one seeded permutation across ranks), and DDP averages the two gradients exactly as
accumulation does. So the loss curves and the trained weights must agree; we allow 1e-5
(absolute, loss in nats; weights) for reduction-order differences, and see 0 on this machine.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from secateurs.checkpoint import save_checkpoint
from test_recover import char_tokenizer
from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]
DDP_CONFIG = ROOT / "configs" / "accelerate" / "ddp.yaml"
TOLERANCE = 1e-5
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny LLaMA and a text whose 64-character blocks all differ."""
    root = tmp_path_factory.mktemp("ddp")
    save_checkpoint(tiny_model("llama"), char_tokenizer(), root / "model", {})
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)]
    (root / "train.txt").write_text("\n".join(lines))
    return root / "model", root / "train.txt"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _recover_args(model: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return [
        "recover", str(model), "--method", "cpt", "--data", str(text), "--tokens", "4096",
        "--seq-len", "64", "--batch-size", "2", "--lr", "2e-2", "--warmup", "0",
        "--out", str(out), *extra,
    ]  # fmt: skip


def _run(command: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def launch(args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/ddp.yaml -m secateurs.cli ARGS``."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    options = ["--config_file", str(DDP_CONFIG), "--main_process_port", str(_free_port())]
    return _run([*launcher, *options, "-m", "secateurs.cli", *args])


def single(args: list[str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "secateurs.cli", *args])


def curve(out: Path) -> list[float]:
    return [point["loss"] for point in json.loads((out / "loss_curve.json").read_text())]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def ddp_out(setup, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    model, text = setup
    out = tmp_path_factory.mktemp("runs") / "ddp"
    return out, launch(_recover_args(model, text, out))


def test_two_processes_train_like_one_with_gradient_accumulation(setup, ddp_out, tmp_path):
    model, text = setup
    ddp, _ = ddp_out
    one = tmp_path / "one"
    single(_recover_args(model, text, one, "--grad-accum", "2"))
    record = json.loads((ddp / "secateurs.json").read_text())["recovery"]
    assert record["stages"][0]["config"]["tokens_per_step"] == 2 * 2 * 64  # world size 2
    assert len(curve(ddp)) == len(curve(one)) == 16
    assert max(abs(a - b) for a, b in zip(curve(ddp), curve(one), strict=True)) <= TOLERANCE
    assert curve(ddp)[-1] < curve(ddp)[0] - 1.0  # it learned
    assert max_weight_difference(ddp, one) <= TOLERANCE


def test_only_the_main_process_reports_the_save(ddp_out):
    _, done = ddp_out
    assert done.stdout.count("saved:") == 1


def test_interrupted_two_process_run_resumes_to_the_same_model(setup, ddp_out, tmp_path):
    model, text = setup
    ddp, _ = ddp_out
    out = tmp_path / "resumed"
    args = _recover_args(model, text, out, "--save-steps", "4")
    launch([*args, "--max-steps", "8"])
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "resumed.work" / "cpt").iterdir()) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    launch([*args, "--resume"])
    assert curve(out) == pytest.approx(curve(ddp), abs=TOLERANCE)
    assert max_weight_difference(out, ddp) <= TOLERANCE


def test_shipped_accelerate_configs_parse():
    """Every config we document loads with accelerate's own parser (FSDP and DeepSpeed need
    GPUs: accelerate's FSDP plugin refuses CPU, and DeepSpeed does not install here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted(DDP_CONFIG.parent.glob("*.yaml")):
        config = load_config_from_file(str(path))
        assert config.num_processes >= 2, path
