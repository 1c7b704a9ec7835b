"""Helpers shared by the benchmark scripts: fresh-process peak memory, tables, JSON output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def run_measured(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Run ``command`` in a fresh process; return (wall seconds, peak RSS in MB) of that process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, command)
    peak_kb = usage.ru_maxrss / (1024 if platform.system() == "Darwin" else 1)
    return time.perf_counter() - start, peak_kb / 1024


def peak_rss_since_reset_mb() -> float:
    """This process's resident-memory high-water mark (MB, the kernel's VmHWM: since the process
    started, or since ``/proc/self/clear_refs`` last reset it). Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmHWM in /proc/self/status")


def secateurs_cli() -> list[str]:
    return [sys.executable, "-m", "secateurs.cli"]


def prune_batched(model, tokenizer, score_batch: int = 1, fit_batch: int = 8, **options):
    """``secateurs.run.prune`` in memory (no record, nothing saved) with scoring run
    ``score_batch`` windows per forward and the fits (reconstruction, healing) ``fit_batch``:
    what the Python API did by default before the redesign, which these benchmarks' published
    numbers used. ``prune`` now takes one batch size for both. Returns the ``Choice``."""
    from secateurs.calibration import Windows
    from secateurs.choose import choose
    from secateurs.fit import cut
    from secateurs.session import ResidentSession
    from secateurs.spec import PruneSpec

    spec = PruneSpec.from_options(batch_size=score_batch, **options)
    session = ResidentSession(model, tokenizer)
    choice = choose(session, spec, Windows(spec.data, session, progress=False))
    # from the options, not spec.replaced(): that rebuilds from to_options(), where a
    # calibration tensor has become its description ("tensor[N, T]")
    fit = PruneSpec.from_options(batch_size=fit_batch, **options)
    cut(session, choice.plan, fit, Windows(fit.data, session, progress=False), choice.means)
    return choice


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns`` as (key, header) pairs."""
    head = "| " + " | ".join(_cell(h) for _, h in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):  # before int: bool is an int
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")  # a literal | would split the cell


def write_atomically(path: Path, text: str) -> None:
    """Temp file + rename: results files accumulate runs, and a killed run must not cut one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(name: str, data: dict, table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_atomically(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")
    write_atomically(RESULTS / f"{name}.md", table + "\n")
    print(table)
    print(f"\nwrote {RESULTS / name}.json and .md")
