"""The joint search against the best single kinds, at the same budget (issue 24).

SmolLM2-135M at a share of the decoder's parameters (``--ratios``, default 0.2 and 0.35). Each
method is a ``secateurs prune`` in a fresh process (wall time, CPU time and peak RSS its own),
then evaluated by the same protocol: WikiText-2 and PTB perplexity, 128-token windows, one BOS
at the stream start, the first ``--max-windows`` windows (``--full``: the whole test sets);
``--lambada N``: LAMBADA (OpenAI) accuracy and target perplexity on the first N passages
(0: all 5,153). Methods:

- ``auto``: ``--unit auto`` (every layer's attention and MLP width chosen together, repaired);
- ``depth``: ``ppl+ --iterative --heal``, as many blocks as the budget needs;
- ``width``: ``influence``, global allocation, reconstruction;
- ``replaceme``: ReplaceMe's selection (arXiv 2505.02819): the contiguous span of blocks whose
  input and output hidden states are closest in angle on the calibration windows, healed by
  least squares into the block before it (ReplaceMe's own estimator, our ``--heal``).

Every finished row is cached in ``--work`` so an interrupted run resumes.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/search.py --ratios 0.2 --lambada 1000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, run_measured, secateurs_cli, write_results  # noqa: E402

MODEL = "smollm2-135m"
METHODS = ("auto", "depth", "width", "replaceme")


def block_share(ratio: float, num_layers: int) -> int:
    """Whole blocks that remove at least ``ratio`` of the decoder (all blocks are equal)."""
    return math.ceil(ratio * num_layers - 1e-9)


def replaceme_span(count: int, windows: int = 32) -> list[int]:
    """The ``count`` consecutive blocks whose input and output are closest in angle, averaged
    over the last token of ``windows`` calibration windows (ReplaceMe's selection, as
    ShortGPT's angular distance of Gromov et al.)."""
    import torch

    from secateurs.data import CalibrationConfig
    from secateurs.models import load_model

    model, tokenizer = load_model(MODEL)
    ids = CalibrationConfig(n_samples=windows).load(tokenizer)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    distances = []
    for first in range(len(states) - count):
        a, b = states[first][:, -1].float(), states[first + count][:, -1].float()
        cosine = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
        distances.append((torch.arccos(cosine) / math.pi).mean().item())
    first = min(range(len(distances)), key=distances.__getitem__)
    return list(range(first, first + count))


def method_flags(method: str, ratio: float, num_layers: int) -> list[str]:
    blocks = block_share(ratio, num_layers)
    if method == "auto":
        return ["--unit", "auto", "--ratio", str(ratio)]
    if method == "depth":
        return ["--unit", "block", "--criterion", "ppl+", "--iterative", "--heal",
                "--remove", str(blocks)]  # fmt: skip
    if method == "width":
        return ["--unit", "width", "--criterion", "influence", "--allocation", "global",
                "--ratio", str(ratio)]  # fmt: skip
    span = replaceme_span(blocks)
    return ["--blocks", ",".join(map(str, span)), "--heal"]


def prune_row(method: str, ratio: float, out: Path, extra: list[str]) -> dict:
    flags = method_flags(method, ratio, 30) + extra
    command = [*secateurs_cli(), "prune", MODEL, *flags, "--out", str(out), "--overwrite"]
    print(f"\n== {method} {ratio}\n{' '.join(command)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds, peak = run_measured(command)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = json.loads((out / "secateurs.json").read_text())
    row = {
        "method": method,
        "ratio": ratio,
        "flags": " ".join(flags),
        "params": record["parameters"]["after"],
        "prune_wall_s": round(seconds, 1),
        "prune_cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime),
        "prune_peak_mb": round(peak),
    }
    search = (record.get("selection") or {}).get("search") or record.get("search") or {}
    if "predicted_kl" in search:
        row["predicted_kl"] = round(search["predicted_kl"], 5)
        row["search_s"] = search.get("seconds")
    return row


def perplexities(folder: Path, args) -> dict:
    command = [*secateurs_cli(), "eval", "ppl", str(folder), "--dataset", "wikitext2,ptb", "--json"]
    if not args.full:
        command += ["--max-windows", str(args.max_windows)]
    start = time.perf_counter()
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    found = dict(_ppl_entries(json.loads(text[text.index("{") :])))
    return {**found, "eval_s": round(time.perf_counter() - start)}


def _ppl_entries(data):
    """(dataset, ppl) for every wikitext2 / ptb result anywhere in the printed JSON."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in ("wikitext2", "ptb") and isinstance(value, dict) and "ppl" in value:
                yield key, round(value["ppl"], 2)
            else:
                yield from _ppl_entries(value)
    elif isinstance(data, list):
        for item in data:
            yield from _ppl_entries(item)


def inference_peak_mb(work: Path) -> float:
    """Peak RSS of a fresh process that loads the dense model and runs perplexity windows: the
    inference pass the search's memory is compared with."""
    cache = work / "inference.json"
    if not cache.is_file():
        command = [*secateurs_cli(), "eval", "ppl", MODEL, "--dataset", "wikitext2",
                   "--max-windows", "8"]  # fmt: skip
        cache.write_text(json.dumps({"peak_mb": round(run_measured(command)[1])}))
    return json.loads(cache.read_text())["peak_mb"]


def lambada(folder: Path, limit: int) -> dict:
    command = [*secateurs_cli(), "eval", "zeroshot", str(folder), "--tasks", "lambada_openai",
               "--json"]  # fmt: skip
    if limit:
        command += ["--limit", str(limit)]
    text = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    metrics = json.loads(text[text.index("{") :])["zeroshot"]["metrics"]["lambada_openai"]
    return {"lambada_acc": round(metrics["acc"], 4), "lambada_ppl": round(metrics["perplexity"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--full", action="store_true", help="whole test sets")
    parser.add_argument("--lambada", type=int, default=None, help="N passages (0: all)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-search"))
    parser.add_argument("--extra", default="", help="flags added to every prune")
    parser.add_argument("--name", default="search")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for ratio in map(float, args.ratios.split(",")):
        for method in args.methods.split(","):
            rows.append(cached_row(method, ratio, args))
    columns = [("method", "method"), ("ratio", "share"), ("params", "params"),
               ("wikitext2", "WikiText-2"), ("ptb", "PTB"), ("lambada_acc", "LAMBADA acc"),
               ("lambada_ppl", "LAMBADA ppl"), ("prune_cpu_s", "prune CPU s"),
               ("prune_peak_mb", "prune peak MB"),
               ("peak_vs_inference", "× inference peak"),
               ("flags", "flags")]  # fmt: skip
    inference = inference_peak_mb(args.work)
    for row in rows:
        row["peak_vs_inference"] = round(row["prune_peak_mb"] / inference, 2)
    protocol = "full test sets" if args.full else f"first {args.max_windows} windows"
    table = f"SmolLM2-135M, PPL on {protocol} (128 tokens, BOS at the stream start)\n\n"
    write_results(args.name, {"rows": rows, "protocol": protocol, "inference_peak_mb": inference},
                  table + markdown_table(rows, columns))  # fmt: skip


def cached_row(method: str, ratio: float, args) -> dict:
    key = f"{method}-{ratio}{'-full' if args.full else ''}{args.extra.replace(' ', '_')}"
    cache = args.work / f"{key}.json"
    row = json.loads(cache.read_text()) if cache.is_file() else {}
    out = args.work / f"{method}-{ratio}"
    if "params" not in row:
        row = prune_row(method, ratio, out, args.extra.split())
    if "wikitext2" not in row:
        row.update(perplexities(out, args))
    if args.lambada is not None and "lambada_acc" not in row:
        row.update(lambada(out, args.lambada), lambada_passages=args.lambada or 5153)
    cache.write_text(json.dumps(row, indent=2))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"{time.perf_counter() - start:.0f} s")
