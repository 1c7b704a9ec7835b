"""Do our exports run in real engines, and compute what transformers computes?

Builds llama.cpp from source once (``secateurs.llamacpp``: the C++ tree inside the
llama-cpp-python source distribution from PyPI; here libllama plus our two small tools
``llama_nll.cpp`` and ``llama_tokenize.cpp``),
prunes SmolLM2 seven ways with cheap criteria, exports each model as GGUF (f32 and f16), DeciLM
and plain HF (where expressible), and compares perplexity on the same WikiText-2 token windows:

- transformers fp32 on the pruned checkpoint (``secateurs.load_model``): the reference;
- llama.cpp on the GGUF export (token ids fed directly: no tokenizer in the comparison);
- transformers on the DeciLM export with ``trust_remote_code`` (our shipped modeling code);
- plain ``from_pretrained`` on the hf export.

It also checks that llama.cpp tokenizes text with the GGUF's vocabulary as transformers does.

    python benchmarks/engines.py [--cache DIR] [--windows 32] [--jobs 2]

The llama.cpp build is cached in ``--cache`` (default $SECATEURS_LLAMACPP or
~/.cache/secateurs/llamacpp); tests/test_export.py uses the same cache when that variable is set.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, secateurs_cli, write_results  # noqa: E402

from secateurs import llamacpp  # noqa: E402

HERE = Path(__file__).parent
TOOLS = (HERE / "llama_nll.cpp", HERE / "llama_tokenize.cpp")
CACHE_ENV = llamacpp.CACHE_ENV

# name -> `secateurs prune` arguments (None: the dense model itself)
WIDTH = ["--unit", "width", "--criterion", "fluctuation", "--ratio", "0.2"]  # FLAP: with biases
MODELS: dict[str, list[str] | None] = {
    "dense": None,
    "depth (6 blocks)": ["--unit", "block", "--criterion", "magnitude+", "--remove", "6"],
    "uniform width 20%": WIDTH,
    "global width 20%": [*WIDTH, "--allocation", "global"],
    "global width 20%, --target vllm": [*WIDTH, "--allocation", "global", "--target", "vllm"],
    "attention removed (8)": ["--unit", "attn", "--criterion", "magnitude+", "--remove", "8"],
    "MLP removed (4)": ["--unit", "mlp", "--criterion", "magnitude+", "--remove", "4"],
}


# --- llama.cpp build (cached; shared with secateurs.latency) -----------------------------------
def build_tools(cache: Path, jobs: int) -> dict[str, Path]:
    """libllama (nice'd, ``jobs`` compile jobs) and our tools linked to it; cached."""
    return {source.stem: llamacpp.compile_tool(cache, source, jobs) for source in TOOLS}


def same_tokens(tokenizer_tool: Path, gguf: Path, text: str, work: Path) -> dict:
    """Does llama.cpp split ``text`` with the GGUF's vocabulary as transformers does?"""
    from secateurs import load_model

    _, tokenizer = load_model("smollm2-135m")
    (work / "text.txt").write_text(text)
    run = [str(tokenizer_tool), str(gguf), str(work / "text.txt"), str(work / "text.i32")]
    subprocess.run(run, check=True, capture_output=True)
    ours = np.fromfile(work / "text.i32", dtype="<i4").tolist()
    theirs = tokenizer(text, add_special_tokens=False)["input_ids"]
    return {"tokens": len(theirs), "identical": ours == theirs}


def llama_cpp_nll(scorer: Path, gguf: Path, tokens: Path, window: int, count: int) -> float:
    """Mean next-token NLL of llama.cpp over the windows."""
    run = subprocess.run(
        ["nice", "-n", "10", str(scorer), str(gguf), str(tokens), str(window), str(count),
         str(gguf.with_suffix(".logits"))],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    rows = [line.split() for line in run.stdout.splitlines() if line.strip()]
    return sum(float(r[1]) for r in rows) / sum(int(r[2]) for r in rows)


# --- models, exports, references ---------------------------------------------------------------
def cli(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(["nice", "-n", "10", *secateurs_cli(), *args], check=True, env=env)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build_model(name: str, args: list[str] | None, work: Path) -> str:
    if args is None:
        return "smollm2-135m"
    out = work / "models" / slug(name)
    if not (out / "config.json").is_file():
        data = (
            ["--data-dir", os.environ["SECATEURS_DATA_DIR"]]
            if "SECATEURS_DATA_DIR" in os.environ
            else []
        )
        cli("prune", "smollm2-135m", *args, *data, "--out", str(out), "--overwrite")
    return str(out)


def load_text(data_root: str | None) -> str:
    from secateurs.data import load_eval_text

    return load_eval_text("wikitext2", None, data_root).text


def dense_gguf(work: Path) -> Path:
    path = work / "exports" / f"{slug('dense')}.f32.gguf"
    if not path.is_file():
        from secateurs.export import export

        export("smollm2-135m", "gguf", path, overwrite=True, dtype="f32")
    return path


def windows(count: int, seq_len: int, data_root: str | None) -> torch.Tensor:
    from secateurs import load_model
    from secateurs.evaluate.ppl import PPLProtocol, windows_of

    _, tokenizer = load_model("smollm2-135m")
    ids = tokenizer(load_text(data_root), add_special_tokens=False)
    protocol = PPLProtocol(seq_len=seq_len, bos="stream")
    return windows_of(ids["input_ids"], protocol, tokenizer.bos_token_id)[:count]


def transformers_nll(model, batches: torch.Tensor) -> float:
    from secateurs.evaluate.ppl import window_nll

    torch.set_num_threads(1)
    total, count = 0.0, 0
    for i in range(0, len(batches), 8):
        nll, n = window_nll(model.eval(), batches[i : i + 8])
        total, count = total + nll, count + n
    return total / count


def reference(location: str, batches: torch.Tensor) -> tuple[float, torch.Tensor]:
    """transformers fp32: mean NLL, and the logits at the last position of the first window."""
    from secateurs import load_model

    model, _ = load_model(location)
    with torch.no_grad():
        last = model(batches[:1]).logits[0, -1]
    return transformers_nll(model, batches), last


def parameters(location: str) -> int:
    """Parameters after pruning, from the run record (the dense model: counted)."""
    from secateurs.checkpoint import read_record
    from secateurs.models import resolve_model

    recorded = read_record(resolve_model(location)).get("parameters", {}).get("after")
    if recorded is not None:
        return int(recorded)
    from secateurs import load_model
    from secateurs.runinfo import count_parameters

    return count_parameters(load_model(location)[0])


def plain_nll(export: Path, batches: torch.Tensor) -> float:
    """The hf export through plain ``from_pretrained`` (no secateurs code)."""
    from transformers import AutoModelForCausalLM

    return transformers_nll(AutoModelForCausalLM.from_pretrained(export, dtype="float32"), batches)


def decilm_nll(export: Path, batches: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype="float32")
    return transformers_nll(model, batches)


def export_all(location: str, stem: Path) -> dict[str, str | None]:
    """Export to gguf f32/f16 and decilm; a refusal is recorded as its message."""
    from secateurs.errors import SecateursError
    from secateurs.export import export

    results: dict[str, str | None] = {}
    for key, to, out, dtype in (
        ("gguf_f32", "gguf", stem.with_suffix(".f32.gguf"), "f32"),
        ("gguf_f16", "gguf", stem.with_suffix(".f16.gguf"), "f16"),
        ("decilm", "decilm", stem.with_suffix(".decilm"), "f16"),
        ("hf", "hf", stem.with_suffix(".hf"), "f16"),
    ):
        try:
            export(location, to, out, overwrite=True, dtype=dtype)
            results[key] = str(out)
        except SecateursError as err:
            results[key] = None
            results[f"{key}_refused"] = str(err)
    return results


def measure(name: str, location: str, batches, tokens: Path, scorer: Path, work: Path) -> dict:
    row: dict = {"model": name, "source": location}
    start = time.perf_counter()
    nll, last = reference(location, batches)
    row["ppl_transformers"] = math.exp(nll)
    row["params_m"] = parameters(location) / 1e6
    paths = export_all(location, work / "exports" / slug(name))
    row.update({k: v for k, v in paths.items() if k.endswith("_refused")})
    row["refused"] = ", ".join(k[: -len("_refused")] for k in paths if k.endswith("_refused"))
    for key in ("gguf_f32", "gguf_f16"):
        if paths.get(key):
            nll = llama_cpp_nll(scorer, Path(paths[key]), tokens, batches.shape[1], len(batches))
            row[f"ppl_{key}"] = math.exp(nll)
            row[f"delta_{key}_pct"] = 100 * (row[f"ppl_{key}"] / row["ppl_transformers"] - 1)
            logits = torch.from_numpy(np.fromfile(Path(paths[key]).with_suffix(".logits"), "<f4"))
            row[f"max_logit_diff_{key}"] = float((logits - last).abs().max())
    if paths.get("decilm"):
        row["ppl_decilm"] = math.exp(decilm_nll(Path(paths["decilm"]), batches))
    if paths.get("hf"):
        row["ppl_hf"] = math.exp(plain_nll(Path(paths["hf"]), batches))
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(row, flush=True)
    return row


def display(row: dict) -> dict:
    """Small differences shown with their digits (the JSON keeps full precision)."""
    shown = dict(row)
    for key, form in (("delta_gguf_f32_pct", "+.4f"), ("delta_gguf_f16_pct", "+.4f")):
        if key in row:
            shown[key] = format(row[key], form)
    for key in ("max_logit_diff_gguf_f32", "max_logit_diff_gguf_f16"):
        if key in row:
            shown[key] = f"{row[key]:.1e}"
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help=f"llama.cpp build cache (default ${CACHE_ENV})")
    parser.add_argument("--work", type=Path, help="pruned models and exports (default: CACHE/work)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    parser.add_argument("--data-dir", default=os.environ.get("SECATEURS_DATA_DIR"))
    parser.add_argument("--only", nargs="*", help="model names to run (default: all)")
    parser.add_argument("--tokenizer-chars", type=int, default=200_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tools = build_tools(llamacpp.cache_dir(args.cache), args.jobs)
    scorer = tools["llama_nll"]
    args.work = args.work or llamacpp.cache_dir(args.cache) / "work"
    args.work.mkdir(parents=True, exist_ok=True)
    batches = windows(args.windows, args.seq_len, args.data_dir)
    tokens = args.work / "tokens.i32"
    batches.to(torch.int32).numpy().tofile(tokens)
    rows = []
    for name, prune_args in MODELS.items():
        if args.only and name not in args.only:
            continue
        location = build_model(name, prune_args, args.work)
        rows.append(measure(name, location, batches, tokens, scorer, args.work))
    table = markdown_table(
        [display(row) for row in rows],
        [
            ("model", "model"),
            ("params_m", "params (M)"),
            ("ppl_transformers", "transformers fp32 PPL"),
            ("ppl_gguf_f32", "llama.cpp f32 PPL"),
            ("delta_gguf_f32_pct", "Δ f32 %"),
            ("ppl_gguf_f16", "llama.cpp f16 PPL"),
            ("delta_gguf_f16_pct", "Δ f16 %"),
            ("max_logit_diff_gguf_f32", "max abs Δlogit f32"),
            ("max_logit_diff_gguf_f16", "max abs Δlogit f16"),
            ("ppl_decilm", "DeciLM export PPL (transformers, remote code)"),
            ("ppl_hf", "hf export PPL (plain from_pretrained)"),
            ("refused", "refused (reason in JSON)"),
        ],
    )
    protocol = {
        "dataset": "wikitext2 test",
        "windows": len(batches),
        "seq_len": args.seq_len,
        "bos": "stream",
        "llama_cpp_threads": 1,
        "tokens_fed_as_ids": True,
    }
    text = load_text(args.data_dir)[: args.tokenizer_chars]
    tokenization = same_tokens(tools["llama_tokenize"], dense_gguf(args.work), text, args.work)
    table += (
        f"\n\nllama.cpp tokenization of the first {len(text):,} characters of WikiText-2 test "
        f"with the dense GGUF's vocabulary ({tokenization['tokens']:,} tokens): "
        f"{'identical to' if tokenization['identical'] else 'DIFFERENT from'} transformers'."
    )
    data = {"protocol": protocol, "rows": rows, "tokenization": tokenization}
    write_results("engines", data, table)


if __name__ == "__main__":
    main()
