"""Issue 23's acceptance: the same measurements before and after the redesign, in one run.

Each part runs a benchmark script of each side — the code before the redesign (a checkout of
``--base``, its own scripts with ``PYTHONPATH=BASE/src``, cwd ``BASE``) and this tree (its
scripts, ``PYTHONPATH=src``) — in fresh processes, on the same settings, and compares what
they report:

- ``width``: ``benchmarks/width.py`` at ``llm-pruner`` and ``global-27`` with ``influence`` and
  reconstruction, 64 windows (and the dense row): PPL to 1e-3, parameters exactly;
- ``depth``: ``benchmarks/depth.py`` for ``ppl+ --iterative`` (seed 0, with and without
  ``--heal``) at 6 and 10 blocks, with its anchor selections: chosen blocks exactly, PPL to 1e-3;
- ``experts``: ``benchmarks/experts.py``: sizes exactly, Δlogit to 1e-3;
- ``memory`` (not in the default parts): peak RSS of the same ``secateurs prune … ppl+
  --iterative`` command line on both sides, the least of two fresh processes;
- ``scale``: ``benchmarks/scale.py`` on the 3B-shaped random checkpoint, one step at a time:
  removed units and output sizes exactly, every output tensor compared between the sides (equal
  tensors: equal PPL), peak RSS within 10%.

Scripts run from a copy of each side's ``benchmarks/`` under ``--work`` (their results files go
there, not into either tree). Every side of every part (every scale step) is cached in
``--work`` as it finishes, so an interrupted run resumes; ``--fresh PART`` reruns one.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/redesign_check.py --parts experts,width,depth
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/redesign_check.py --parts scale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("experts", "width", "depth", "scale")
PPL_TOLERANCE = 1e-3
MEMORY_TOLERANCE = 0.10
SCALE_STEPS = (1, 2, 3, 4, 5)
DISK_NEEDED_GB = 26


@dataclass(frozen=True)
class Side:
    name: str
    root: Path  # its checkout: src/, benchmarks/, the cwd of its scripts

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.root / "src"), "OMP_NUM_THREADS": "1"}


# --- running one side of one part --------------------------------------------------------------
class Runner:
    """Runs each side's scripts from a copy of its benchmarks/ under ``work``; caches results."""

    def __init__(self, work: Path, sides: dict[str, Side]) -> None:
        self.work, self.sides = work, sides
        (work / "cache").mkdir(parents=True, exist_ok=True)

    def cached(self, key: str) -> dict | None:
        path = self.work / "cache" / f"{key}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def store(self, key: str, value: dict) -> dict:
        path = self.work / "cache" / f"{key}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
        return value

    def drop(self, key: str) -> None:
        (self.work / "cache" / f"{key}.json").unlink(missing_ok=True)

    def scripts(self, side: Side, part: str, fresh: bool = True) -> Path:
        """A copy of ``side``'s benchmarks/ for ``part`` (fresh: the previous copy goes)."""
        folder = self.work / side.name / part / "benchmarks"
        if fresh and folder.exists():
            shutil.rmtree(folder)
        if not folder.exists():
            shutil.copytree(side.root / "benchmarks", folder)
        return folder

    def run(self, side: Side, part: str, script: Path, args: list[str]) -> float:
        """Run ``script`` with ``args`` as ``side``; its output goes to a log. Wall seconds."""
        check_import(side)
        log = self.work / side.name / part / "log.txt"
        command = ["nice", "-n", "10", sys.executable, str(script), *args]
        print(f"[{side.name}] {part}: {' '.join(command[3:])} (log {log})", flush=True)
        start = time.perf_counter()
        with log.open("a") as out:
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            done = subprocess.run(command, cwd=side.root, env=side.env, stdout=out, stderr=out)
        if done.returncode != 0:
            raise SystemExit(f"[{side.name}] {part} failed ({done.returncode}); see {log}")
        return time.perf_counter() - start


def check_import(side: Side) -> None:
    """The side's scripts must import the side's own package (not an installed one)."""
    found = subprocess.run(
        [sys.executable, "-c", "import secateurs; print(secateurs.__file__)"],
        cwd=side.root, env=side.env, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    if not found.startswith(str(side.root / "src")):
        raise SystemExit(f"[{side.name}] imports secateurs from {found}, not {side.root}/src")


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(runner: Runner, side: Side, part: str, measure) -> dict:
    """``measure()``'s result for one side, cached, with its wall time and the machine's load."""
    key = f"{part}.{side.name}"
    found = runner.cached(key)
    if found is not None:
        return found
    before = load()
    start = time.perf_counter()
    result = measure()
    seconds = round(time.perf_counter() - start, 1)
    info = {"seconds": seconds, "load_start": before, "load_end": load()}
    return runner.store(key, {"result": result, **info})


# --- the parts ----------------------------------------------------------------------------------
def measure_width(runner: Runner, side: Side) -> dict:
    folder = runner.scripts(side, "width")
    script = folder / "width.py"
    text = script.read_text()
    default = '"/tmp/secateurs-width-bench"'
    if text.count(default) != 1:
        raise SystemExit(f"{script}: its score cache is not {default}; update redesign_check.py")
    script.write_text(text.replace(default, repr(str(folder.parent / "score-cache"))))
    args = ["--criteria", "influence", "--settings", "llm-pruner,global-27"]
    args += ["--reconstruct", "on", "--max-windows", "64", "--name", "redesign-width"]
    runner.run(side, "width", script, args)
    return json.loads((folder / "results" / "redesign-width.json").read_text())


def measure_depth(runner: Runner, side: Side) -> dict:
    folder = runner.scripts(side, "depth")
    args = ["--methods", "ppl+:iterative", "--seeds", "0", "--budgets", "6,10"]
    args += ["--max-windows", "64", "--workers", "1", "--name", "redesign-depth"]
    args += ["--cache", str(folder.parent / "evaluations.json")]
    (folder.parent / "evaluations.json").unlink(missing_ok=True)
    runner.run(side, "depth", folder / "depth.py", args)
    return json.loads((folder / "results" / "redesign-depth.json").read_text())


# The depth benchmark passes the one flow its own batch size (8), the old CLI its default: the
# same user command on both sides is what the memory verdict compares.
MEMORY_COMMAND = [
    "prune",
    "smollm2-135m",
    "--criterion",
    "ppl+",
    "--remove",
    "10",
    "--iterative",
    "--shortlist",
    "3",
    "--n-samples",
    "10",
    "--calib-seq-len",
    "128",
    "--seed",
    "0",
]


def measure_memory(runner: Runner, side: Side, repeats: int = 2) -> dict:
    """Peak RSS of ``secateurs`` running MEMORY_COMMAND in fresh processes (the least of
    ``repeats``: glibc's allocation history moves a peak by ~0.1 GB between runs)."""
    check_import(side)
    out = runner.work / side.name / "memory" / "out"
    command = ["nice", "-n", "10", sys.executable, "-m", "secateurs.cli", *MEMORY_COMMAND]
    command += ["--out", str(out), "--overwrite"]
    peaks = []
    for _ in range(repeats):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        process = subprocess.Popen(command, cwd=side.root, env=side.env, **quiet)
        _, status, usage = os.wait4(process.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"[{side.name}] memory: {' '.join(command)} failed")
        peaks.append(round(usage.ru_maxrss / 1024))
    shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_mb": min(peaks), "peaks_mb": peaks, "command": " ".join(MEMORY_COMMAND)}


def compare_memory(before: dict, after: dict) -> list[dict]:
    name = f"`secateurs {before['command']}`: peak RSS MB (least of {len(before['peaks_mb'])})"
    return [row(name, before["peak_rss_mb"], after["peak_rss_mb"], "memory")]


def measure_experts(runner: Runner, side: Side) -> dict:
    folder = runner.scripts(side, "experts")
    runner.run(side, "experts", folder / "experts.py", [])
    return json.loads((folder / "results" / "experts.json").read_text())


def measure_combined(runner: Runner, side: Side) -> dict:
    """combined.py at depth share 0.5 (not in the default parts: the budget split of the
    staged plan, whose width sensitivity the redesign may size differently)."""
    folder = runner.scripts(side, "combined")
    runner.run(side, "combined", folder / "combined.py", ["--shares", "0.5"])
    return json.loads((folder / "results" / "combined.json").read_text())


def scale_step(runner: Runner, side: Side, step: int) -> dict:
    """One step of scale.py (a fresh results table, so the row read back is this run's)."""
    folder = runner.scripts(side, "scale", fresh=False)
    (folder / "results" / "scale.json").write_text(json.dumps({"rows": []}))
    work = runner.work / side.name / "scale" / "work"
    args = ["--work", str(work), "--steps", str(step), "--keep"]
    runner.run(side, "scale", folder / "scale.py", args)
    (row,) = json.loads((folder / "results" / "scale.json").read_text())["rows"]
    return row


def scale_output(runner: Runner, side: Side, step: int) -> Path:
    return runner.work / side.name / "scale" / "work" / f"out-{step}"


def scale_source(runner: Runner, side: Side) -> Path:
    return runner.work / side.name / "scale" / "work" / "llama-3.2-3b-random"


def run_scale(runner: Runner, sides: dict[str, Side], steps) -> None:
    """Per step: each side, then the outputs compared tensor by tensor and deleted."""
    free = shutil.disk_usage(runner.work).free / 1e9
    if free < DISK_NEEDED_GB:  # two 6.4 GB sources and two outputs of up to 5.3 GB
        raise SystemExit(f"scale needs {DISK_NEEDED_GB} GB free in {runner.work}; {free:.0f}.")
    for step in steps:
        key = f"scale-{step}.compare"
        if runner.cached(key) is not None:
            continue
        for side in sides.values():
            if not scale_output(runner, side, step).is_dir():  # measured, output gone: again
                runner.drop(f"scale-{step}.{side.name}")
            timed(
                runner,
                side,
                f"scale-{step}",
                lambda side=side, step=step: scale_step(runner, side, step),
            )
        a, b = (scale_output(runner, side, step) for side in sides.values())
        runner.store(key, compare_checkpoints(a, b))
        for side in sides.values():
            shutil.rmtree(scale_output(runner, side, step))
    if all(runner.cached(f"scale-{s}.compare") for s in SCALE_STEPS):
        if runner.cached("scale-source.compare") is None:
            a, b = (scale_source(runner, side) for side in sides.values())
            runner.store("scale-source.compare", compare_checkpoints(a, b))
        for side in sides.values():
            shutil.rmtree(runner.work / side.name / "scale" / "work", ignore_errors=True)


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Every tensor of two checkpoints compared, in a fresh process (it reads GBs)."""
    done = subprocess.run(
        [sys.executable, __file__, "--compare-tensors", str(a), str(b)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(done.stdout.splitlines()[-1])


def tensor_differences(a: Path, b: Path) -> dict:
    """Names, shapes and dtypes equal? The largest |a − b| over all tensors (float64, in row
    blocks: one tensor at a time is never read whole), and how many tensors differ at all."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for path in sorted(folder.glob("*.safetensors")):
            with safe_open(path, "pt") as f:
                found.update({name: path for name in f.keys()})  # noqa: SIM118 (not a dict)
        return found

    left, right = tensors(a), tensors(b)
    worst, worst_name, differing = 0.0, None, 0
    for name in sorted(set(left) & set(right)):
        with safe_open(left[name], "pt") as f, safe_open(right[name], "pt") as g:
            x, y = f.get_slice(name), g.get_slice(name)
            if x.get_shape() != y.get_shape() or x.get_dtype() != y.get_dtype():
                differing += 1
                worst_name = worst_name or f"{name} (shape/dtype)"
                continue
            rows = x.get_shape()[0] if x.get_shape() else 1
            diff = 0.0
            for start in range(0, rows, 2048):
                p = x[start : start + 2048] if x.get_shape() else f.get_tensor(name)
                q = y[start : start + 2048] if y.get_shape() else g.get_tensor(name)
                diff = max(diff, float((p.double() - q.double()).abs().max()) if p.numel() else 0)
        differing += diff > 0
        if diff > worst:
            worst, worst_name = diff, name
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    for config in configs:
        config.pop("transformers_version", None)
    return {
        "tensors": len(left),
        "same_names": set(left) == set(right),
        "only_before": sorted(set(left) - set(right))[:5],
        "only_after": sorted(set(right) - set(left))[:5],
        "differing_tensors": differing,
        "max_abs_diff": worst,
        "worst_tensor": worst_name,
        "same_config": configs[0] == configs[1],
    }


# --- comparing ------------------------------------------------------------------------------------
def row(metric: str, before, after, kind: str) -> dict:
    """One line of the table. ``kind``: ppl (to 1e-3), exact, memory (10%), info (no verdict)."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (before, after))
    difference = after - before if numbers else None
    ok = {
        "ppl": numbers and abs(difference) <= PPL_TOLERANCE,
        "memory": numbers and abs(difference) <= MEMORY_TOLERANCE * abs(before),
        "exact": before == after,
    }.get(kind)
    if kind == "memory" and numbers:
        difference = f"{difference:+,.0f} ({difference / before:+.1%})"
    elif isinstance(difference, float):
        difference = f"{difference:+.2e}"
    verdict = {True: "same", False: "DIFFERS", None: "–"}[ok]
    return {
        "metric": metric,
        "before": shown(before),
        "after": shown(after),
        "difference": difference,
        "verdict": verdict,
    }


def shown(value):
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return value


def keyed(rows: list[dict], *keys: str) -> dict[tuple, dict]:
    return {tuple(r[k] for k in keys): r for r in rows}


def ppl_rows(name: str, old: dict, new: dict) -> list[dict]:
    return [
        row(f"{name}: WikiText-2 PPL", old["wikitext2"], new.get("wikitext2"), "ppl"),
        row(f"{name}: PTB PPL", old["ptb"], new.get("ptb"), "ppl"),
    ]


def compare_width(before: dict, after: dict) -> list[dict]:
    lines = []
    new_rows = keyed(after["rows"], "setting", "criterion")
    for key, old in keyed(before["rows"], "setting", "criterion").items():
        new = new_rows.get(key, {})
        name = "width " + (key[0] if key[0] == "dense" else " ".join(key))
        lines += ppl_rows(name, old, new)
        lines.append(row(f"{name}: parameters", old["params"], new.get("params"), "exact"))
        if "peak_mb" in old:
            peak = new.get("peak_mb")
            lines.append(row(f"{name}: scoring peak RSS MB", old["peak_mb"], peak, "memory"))
            for t in ("scoring_s", "reconstruct_s"):
                lines.append(row(f"{name}: {t}", old[t], new.get(t), "info"))
    return lines


def compare_depth(before: dict, after: dict) -> list[dict]:
    lines = []
    new_rows = keyed(after["rows"], "method", "budget", "healed")
    for (method, budget, healed), old in keyed(
        before["rows"], "method", "budget", "healed"
    ).items():
        new = new_rows.get((method, budget, healed), {})
        name = f"depth {method} {budget}{' --heal' if healed else ''}"
        if budget:
            lines.append(row(f"{name}: removed", old["removed"], new.get("removed"), "exact"))
        lines += ppl_rows(name, old, new)
    for method, old in before.get("methods", {}).items():
        new = after.get("methods", {}).get(method, {})
        peak = new.get("peak_rss_mb")
        lines.append(
            row(f"depth {method}: scoring peak RSS MB", old["peak_rss_mb"], peak, "memory")
        )
        lines.append(
            row(f"depth {method}: scoring s", old["scoring_s"], new.get("scoring_s"), "info")
        )
        lines += compare_search(f"depth {method}", old.get("search"), new.get("search") or {})
    return lines


def compare_search(name: str, old: dict | None, new: dict) -> list[dict]:
    """The greedy search's order, its calibration PPL after each step, its first-step scores."""
    if not old:
        return []
    lines = [row(f"{name}: search order", old["order"], new.get("order"), "exact")]
    (key,) = [k for k in old if k.startswith("calibration_")]  # _ppl or _kl: the objective
    after = new.get(key, [])
    for i, value in enumerate(old[key]):
        other = after[i] if i < len(after) else None
        lines.append(row(f"{name}: {key} after step {i + 1}", value, other, "ppl"))
    for kind, values in old["first_step_scores"].items():
        other = new.get("first_step_scores", {}).get(kind, [None] * len(values))
        # layers not scored (protected: NaN), which must be the same on both sides
        unscored = [[i for i, v in enumerate(side) if not finite(v)] for side in (values, other)]
        lines.append(row(f"{name}: first-step {kind}: layers not scored", *unscored, "exact"))
        pairs = [(x, y) for x, y in zip(values, other, strict=True) if finite(x) and finite(y)]
        gap = max((abs(x - y) for x, y in pairs), default=None)
        lines.append(row(f"{name}: first-step {kind} scores, largest |Δ|", 0.0, gap, "ppl"))
    return lines


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def compare_experts(before: dict, after: dict) -> list[dict]:
    lines = []
    for old, new in zip(before["rows"], after["rows"], strict=True):
        name = f"experts {old['experts']}"
        for key in ("params_m", "weight_mb", "macs_m"):
            lines.append(row(f"{name}: {key}", old[key], new[key], "exact"))
        error = (float(old["max_err"]), float(new["max_err"]))
        lines.append(row(f"{name}: max |Δlogit| vs masked", *error, "ppl"))
        lines.append(row(f"{name}: latency s", old["latency_s"], new["latency_s"], "info"))
    return lines


def compare_combined(before: dict, after: dict) -> list[dict]:
    lines = []
    new_rows = keyed(after["rows"], "depth_share")
    for (share,), old in keyed(before["rows"], "depth_share").items():
        new, name = new_rows.get((share,), {}), f"combined share {share}"
        for key in ("blocks", "achieved_ratio", "params_m"):
            lines.append(row(f"{name}: {key}", old[key], new.get(key), "exact"))
        lines += ppl_rows(name, old, new)
    return lines


def compare_scale(runner: Runner, sides: dict[str, Side]) -> list[dict]:
    lines = []
    for step in SCALE_STEPS:
        old, new = (runner.cached(f"scale-{step}.{s}") for s in sides)
        tensors = runner.cached(f"scale-{step}.compare")
        if old and new and tensors:
            lines += scale_rows(step, old["result"], new["result"], tensors)
    source = runner.cached("scale-source.compare")
    if source:
        lines += tensor_rows("scale: the random source checkpoints", source)
    return lines


def scale_rows(step: int, old: dict, new: dict, tensors: dict) -> list[dict]:
    name = f"scale {step} ({old['step'].split(',')[0]})"
    lines = [
        row(f"{name}: removed / kept", old["removed"], new["removed"], "exact"),
        row(f"{name}: output GB", old["output_gb"], new["output_gb"], "exact"),
        row(f"{name}: peak RSS MB", old["peak_rss_mb"], new["peak_rss_mb"], "memory"),
        row(f"{name}: wall s", old["wall_s"], new["wall_s"], "info"),
        row(f"{name}: plain from_pretrained", old["plain_load"], new["plain_load"], "exact"),
    ]
    if old["plain_load_peak_mb"]:
        peaks = (old["plain_load_peak_mb"], new["plain_load_peak_mb"])
        lines.append(row(f"{name}: plain load peak RSS MB", *peaks, "memory"))
    return lines + tensor_rows(name, tensors)


def tensor_rows(name: str, tensors: dict) -> list[dict]:
    same = tensors["same_names"] and tensors["same_config"]
    largest = tensors["max_abs_diff"]
    return [
        row(f"{name}: same tensor names and config", True, same, "exact"),
        row(f"{name}: largest |Δ| over all tensors", 0.0, largest, "ppl"),
        row(f"{name}: tensors that differ at all", 0, tensors["differing_tensors"], "info"),
    ]


# --- main ----------------------------------------------------------------------------------------
MEASURES = {
    "width": measure_width,
    "depth": measure_depth,
    "experts": measure_experts,
    "combined": measure_combined,
    "memory": measure_memory,
}
COMPARES = {
    "width": compare_width,
    "depth": compare_depth,
    "experts": compare_experts,
    "combined": compare_combined,
    "memory": compare_memory,
}
COLUMNS = [
    ("metric", "metric"),
    ("before", "before (1fe3184)"),
    ("after", "after"),
    ("difference", "after − before"),
    ("verdict", "verdict"),
]
TIMING = [("part", "part"), ("side", "side"), ("seconds", "wall s"), ("load", "load average")]


def report(runner: Runner, sides: dict[str, Side], name: str) -> None:
    lines, seconds = [], []
    for part in (*PARTS, "combined", "memory"):
        if part == "scale":
            lines += compare_scale(runner, sides)
        else:
            found = [runner.cached(f"{part}.{s}") for s in sides]
            if all(found):
                lines += COMPARES[part](found[0]["result"], found[1]["result"])
        keys = [f"scale-{s}" for s in SCALE_STEPS] if part == "scale" else [part]
        seconds += [timing(runner, key, side) for key in keys for side in sides]
    protocol = (
        "Before: the code and benchmark scripts of commit 1fe3184 (before the redesign); after: "
        "this tree's. Each side's scripts run in fresh processes, one thread, nice 10, on a "
        f"shared 2-core machine. Verdicts: PPL-like numbers to {PPL_TOLERANCE:g} (absolute), "
        f"memory within {MEMORY_TOLERANCE:.0%}, the rest exactly; times are shown, not judged."
    )
    seconds = [s for s in seconds if s]
    table = f"{protocol}\n\n{markdown_table(lines, COLUMNS)}\n\n{markdown_table(seconds, TIMING)}"
    write_results(name, {"protocol": protocol, "rows": lines, "timing": seconds}, table)


def timing(runner: Runner, key: str, side: str) -> dict | None:
    found = runner.cached(f"{key}.{side}")
    if not found:
        return None
    load = f"{found['load_start']} → {found['load_end']}"
    return {"part": key, "side": side, "seconds": found["seconds"], "load": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("/work/base"), help="the old checkout")
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-redesign-check"))
    parser.add_argument(
        "--parts", default=",".join(PARTS), help="also: combined (share 0.5), memory"
    )
    parser.add_argument("--sides", default="before,after", help="run only one side: before")
    parser.add_argument("--steps", default=",".join(map(str, SCALE_STEPS)), help="scale steps")
    parser.add_argument("--fresh", default="", help="parts whose cached results are dropped")
    parser.add_argument("--name", default="redesign-check", help="results/NAME.json and .md")
    args = parser.parse_args()
    sides = {"before": Side("before", args.base.resolve()), "after": Side("after", ROOT)}
    runner = Runner(args.work, sides)
    for key in filter(None, args.fresh.split(",")):
        for path in (args.work / "cache").glob(f"{key}*.json"):
            path.unlink()
    chosen = {name: sides[name] for name in args.sides.split(",")}
    for part in args.parts.split(","):
        if part == "scale":
            if len(chosen) == 2:  # the outputs are compared, then deleted, step by step
                run_scale(runner, sides, [int(s) for s in args.steps.split(",")])
            continue
        for side in chosen.values():
            timed(runner, side, part, lambda side=side, part=part: MEASURES[part](runner, side))
    report(runner, sides, args.name)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare-tensors":
        print(json.dumps(tensor_differences(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        main()
