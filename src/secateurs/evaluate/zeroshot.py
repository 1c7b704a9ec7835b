"""Zero-shot accuracy through lm-evaluation-harness, with tasks fed from local files.

Each task reads its file from the data directory (layout and formats: the data README) into
rows with the Hugging Face dataset's field names, and is evaluated by an lm-eval
``ConfigurableTask`` whose prompt, choices and metrics mirror lm-eval's stock YAML. With no data
directory, lm-eval's stock tasks (which download from the hub) are used instead.

We report the papers' metric per task (LLM-Pruner, Shortened LLaMA, Wanda): boolq acc, piqa acc,
hellaswag acc_norm, winogrande acc, arc_easy acc, arc_challenge acc_norm, openbookqa acc_norm;
and their unweighted mean. LAMBADA (``lambada_openai``: accuracy, and the target's perplexity
beside it) runs when asked for by name.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from secateurs.data import data_dir
from secateurs.errors import ConfigError, DataError
from secateurs.registry import Registry

if TYPE_CHECKING:  # the task list is read by `secateurs ls`, which must not import torch
    from transformers import PreTrainedModel
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

Docs = list[dict[str, Any]]


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot task: its local loader, lm-eval config (minus the dataset) and paper metric."""

    name: str
    metric: str  # the metric the pruning papers report
    files: tuple[str, ...]  # relative to the data directory
    count: int  # documents in the local split (data README)
    load: Callable[[Path], Docs]
    config: dict[str, Any]
    hub_task: str  # lm-eval's stock task name
    note: str = ""
    also: tuple[str, ...] = ()  # further lm-eval metrics shown beside ``metric``
    aliases: tuple[str, ...] = ()


TASKS: Registry[ZeroShotTask] = Registry("zero-shot task")
PAPER_TASKS = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}


# --- file readers -------------------------------------------------------------------------------


def _jsonl(path: Path) -> Docs:
    if not path.is_file():
        raise DataError(f"Expected data file {path} is missing (see the data directory README).")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(path: Path) -> list[int]:
    if not path.is_file():
        raise DataError(f"Expected label file {path} is missing.")
    return [int(line) for line in path.read_text().split()]


def _aligned(rows: Docs, labels: list, path: Path) -> None:
    if len(rows) != len(labels):
        raise DataError(f"{path}: {len(rows)} rows but {len(labels)} labels.")


def load_boolq(root: Path) -> Docs:
    """Google's BoolQ dev release → SuperGLUE fields (``label`` 1 = yes)."""
    rows = _jsonl(root / "boolq" / "dev.jsonl")
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(rows)
    ]


def load_piqa(root: Path) -> Docs:
    rows = _jsonl(root / "piqa" / "valid.jsonl")
    labels = _labels(root / "piqa" / "valid-labels.lst")
    _aligned(rows, labels, root / "piqa")
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": y}
        for r, y in zip(rows, labels, strict=True)
    ]


def load_hellaswag(root: Path) -> Docs:
    """The derived 6-lines-per-item file: query, gold label, four endings (already cleaned)."""
    path = root / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if not path.is_file():
        raise DataError(f"Expected data file {path} is missing.")
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    if len(lines) % 6:
        raise DataError(f"{path}: {len(lines)} lines is not a multiple of 6.")
    items = (lines[i : i + 6] for i in range(0, len(lines), 6))
    return [{"query": q, "choices": endings, "label": int(gold)} for q, gold, *endings in items]


def load_winogrande(root: Path) -> Docs:
    rows = _jsonl(root / "winogrande" / "dev.jsonl")
    return [{k: r[k] for k in ("sentence", "option1", "option2", "answer")} for r in rows]


def _load_ai2(root: Path, relative: str) -> Docs:
    """ARC / OpenBookQA nested ``question`` → HF fields (question text, choices{text,label})."""
    rows = _jsonl(root / relative)
    docs = []
    for r in rows:
        choices = r["question"]["choices"]
        docs.append(
            {
                "id": r["id"],
                "question": r["question"]["stem"],
                "answerKey": r["answerKey"].strip(),
                "choices": {
                    "text": [c["text"] for c in choices],
                    "label": [c["label"] for c in choices],
                },
            }
        )
    return docs


def _arc_gold(doc: dict[str, Any]) -> int:
    return doc["choices"]["label"].index(doc["answerKey"])


# Winogrande partial scoring (lm-eval's setting): each option fills the blank to make a context;
# the continuation scored is the text after the blank, the same for both contexts.
def winogrande_gold(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_contexts(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_continuation(doc: dict[str, Any]) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


# --- the seven tasks ----------------------------------------------------------------------------


def _mc(text: Any, target: Any, choice: Any, metrics=(_ACC, _ACC_NORM)) -> dict[str, Any]:
    return {
        "output_type": "multiple_choice",
        "doc_to_text": text,
        "doc_to_target": target,
        "doc_to_choice": choice,
        "metric_list": [dict(m) for m in metrics],
    }


def _add(task: ZeroShotTask) -> None:
    TASKS.add(task.name, task, aliases=task.aliases)


_add(
    ZeroShotTask(
        "boolq",
        "acc",
        ("boolq/dev.jsonl",),
        3270,
        load_boolq,
        _mc(
            "{{passage}}\nQuestion: {{question}}?\nAnswer:", "label", ["no", "yes"], metrics=(_ACC,)
        ),
        "boolq",
    )
)
_add(
    ZeroShotTask(
        "piqa",
        "acc",
        ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
        1838,
        load_piqa,
        _mc("Question: {{goal}}\nAnswer:", "label", "{{[sol1, sol2]}}"),
        "piqa",
    )
)
_add(
    ZeroShotTask(
        "hellaswag",
        "acc_norm",
        ("hellaswag/hellaswag_val_full.txt.bz2",),
        10042,
        load_hellaswag,
        _mc("{{query}}", "label", "choices"),
        "hellaswag",
        note="derived file: ctx_b not capitalised (lm-eval capitalises it)",
    )
)
_add(
    ZeroShotTask(
        "winogrande",
        "acc",
        ("winogrande/dev.jsonl",),
        1267,
        load_winogrande,
        _mc(winogrande_gold, winogrande_continuation, winogrande_contexts, metrics=(_ACC,)),
        "winogrande",
    )
)
_add(
    ZeroShotTask(
        "arc_easy",
        "acc",
        ("arc/ARC-Easy-Test.jsonl",),
        2376,
        partial(_load_ai2, relative="arc/ARC-Easy-Test.jsonl"),
        _mc("Question: {{question}}\nAnswer:", _arc_gold, "{{choices.text}}"),
        "arc_easy",
    )
)
_add(
    ZeroShotTask(
        "arc_challenge",
        "acc_norm",
        ("arc/ARC-Challenge-Test.jsonl",),
        1172,
        partial(_load_ai2, relative="arc/ARC-Challenge-Test.jsonl"),
        _mc("Question: {{question}}\nAnswer:", _arc_gold, "{{choices.text}}"),
        "arc_challenge",
    )
)
_add(
    ZeroShotTask(
        "openbookqa",
        "acc_norm",
        ("openbookqa/test.jsonl",),
        500,
        partial(_load_ai2, relative="openbookqa/test.jsonl"),
        _mc("question", _arc_gold, "{{choices.text}}"),
        "openbookqa",
        note="context is the bare question stem, as lm-eval",
    )
)


def load_lambada(root: Path) -> Docs:
    """OpenAI's detokenized LAMBADA test set: one passage per row, its last word the target."""
    return [{"text": row["text"]} for row in _jsonl(root / "lambada" / "lambada_test.jsonl")]


# LAMBADA (lm-eval ``lambada_openai``): the context is the passage up to its last space, the
# target " " + its last word; accuracy = every target token is the greedy argmax, perplexity =
# exp of minus the mean (over passages) target log-likelihood. Not one of the papers' seven
# multiple-choice tasks (not in PAPER_TASKS); ReplaceMe and other depth-pruning papers report it.
_add(
    ZeroShotTask(
        "lambada_openai",
        "acc",
        ("lambada/lambada_test.jsonl",),
        5153,
        load_lambada,
        {
            "output_type": "loglikelihood",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
            "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "metric_list": [
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                dict(_ACC),
            ],
        },
        "lambada_openai",
        also=("perplexity",),
        aliases=("lambada",),
    )
)


# --- lm-eval glue -------------------------------------------------------------------------------

SPLIT = "test"


def _dataset(task: ZeroShotTask, root: Path, **_: Any) -> dict[str, Any]:
    """lm-eval ``custom_dataset`` callable (it passes the task metadata as keyword arguments)."""
    import datasets

    docs = task.load(root)
    return {SPLIT: datasets.Dataset.from_list(docs)}


def local_task(name: str, root: Path):
    """An lm-eval ``ConfigurableTask`` for ``name`` reading the local data directory ``root``."""
    from lm_eval.api.task import ConfigurableTask

    task = TASKS.get(name)
    config = dict(
        task.config,
        task=task.name,
        dataset_path=f"local:{root}",
        test_split=SPLIT,
        custom_dataset=partial(_dataset, task, root),
        metadata={"version": 1.0},
    )
    return ConfigurableTask(config=config)


def parse_tasks(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Task names from "boolq,piqa" (canonical, de-duplicated, order kept); all seven by default."""
    if text is None or text in ("all", "paper"):
        return PAPER_TASKS
    items = text.split(",") if isinstance(text, str) else list(text)
    names = [TASKS.canonical(item) for item in items if item.strip()]
    if not names:
        raise ConfigError("No zero-shot tasks given.")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class ZeroShotResult:
    """Per-task paper metric (and every metric lm-eval returned), their mean, and the protocol."""

    scores: dict[str, float]  # task -> paper metric
    metrics: dict[str, dict[str, float]]  # task -> all metrics (acc, acc_norm, stderr...)
    samples: dict[str, int]  # task -> documents evaluated
    mean: float
    seconds: float
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def zeroshot(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    tasks: str | tuple[str, ...] | None = None,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    data_root: str | os.PathLike | None = None,
    seed: int = 0,
) -> ZeroShotResult:
    """Zero-shot accuracy of the in-memory ``model`` (no re-save) via lm-eval's ``HFLM``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    if limit is not None and limit <= 0:
        raise ConfigError(f"limit must be positive; got {limit}.")
    root = data_dir(data_root)
    with harness_quieted():
        task_objects, manager, source = _tasks(names, root)
        lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size)
        start = time.perf_counter()
        output = simple_evaluate(
            model=lm,
            tasks=task_objects,
            limit=limit,
            task_manager=manager,
            num_fewshot=0,
            log_samples=False,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        seconds = time.perf_counter() - start
    protocol = {
        "tasks": list(names),
        "limit": limit,
        "num_fewshot": 0,
        "batch_size": batch_size,
        "source": source,
        "metric": {n: TASKS.get(n).metric for n in names},
        "harness": _version(),
    }
    return _result(output, names, seconds, protocol)


# lm-eval warnings that follow from how we call it, on purpose, and tell a user nothing: an
# in-memory model (no accelerate), num_fewshot=0 for every task, tasks built from configs (so
# the `--metadata` hint). Everything else it warns about (truncated contexts, a task that fails
# to load, --limit) stays visible.
EXPECTED_WARNINGS = (
    "Custom kwargs can be passed to `--metadata`",
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
    "Overwriting default num_fewshot of",
)


class _ExpectedWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in EXPECTED_WARNINGS)


@contextmanager
def harness_quieted() -> Iterator[None]:
    """lm-eval without its expected warnings and, unless secateurs logs at DEBUG (``-v``), its
    per-task INFO lines (seeds, "Building contexts for ..."); both restored afterwards."""
    names = ["lm_eval", *(n for n in logging.root.manager.loggerDict if n.startswith("lm_eval."))]
    loggers = [logging.getLogger(name) for name in names]
    quiet = _ExpectedWarnings()
    root, level = loggers[0], loggers[0].level
    if not log.isEnabledFor(logging.DEBUG):
        root.setLevel(max(logging.WARNING, level))
    for logger in loggers:  # a parent's filter does not see its children's records
        logger.addFilter(quiet)
    try:
        yield
    finally:
        root.setLevel(level)
        for logger in loggers:
            logger.removeFilter(quiet)


def _tasks(names: tuple[str, ...], root: Path | None):
    """Local ConfigurableTasks (and an empty TaskManager, to skip indexing lm-eval's ~15k
    stock configs), or the stock task names when there is no data directory."""
    from lm_eval.tasks import TaskManager

    if root is None:
        log.info("No data directory: using lm-eval's stock tasks (downloads from the hub)")
        return [TASKS.get(n).hub_task for n in names], None, "hub"
    tasks = [local_task(name, root) for name in names]
    return tasks, TaskManager(include_defaults=False), f"local:{root}"


def _result(output: dict[str, Any], names, seconds: float, protocol) -> ZeroShotResult:
    metrics, scores, samples = {}, {}, {}
    for name in names:
        raw = output["results"][TASKS.get(name).hub_task if protocol["source"] == "hub" else name]
        metrics[name] = {
            key.split(",")[0]: float(value)
            for key, value in raw.items()
            if "," in key and isinstance(value, (int, float))
        }
        scores[name] = metrics[name][TASKS.get(name).metric]
        samples[name] = int(output.get("n-samples", {}).get(name, {}).get("effective", 0))
    mean = sum(scores.values()) / len(scores)
    return ZeroShotResult(scores, metrics, samples, mean, seconds, protocol)


def _version() -> str:
    from importlib.metadata import version

    return f"lm-eval {version('lm-eval')}"


def format_table(result: ZeroShotResult) -> str:
    """A markdown table: one row per task (paper metric) and the mean."""
    lines = ["| task | metric | value | n |", "|---|---|---:|---:|"]
    for name, value in result.scores.items():
        metric = result.protocol["metric"][name]
        lines.append(f"| {name} | {metric} | {value:.4f} | {result.samples.get(name, '')} |")
        for other in TASKS.get(name).also:
            extra = result.metrics[name].get(other)
            if extra is not None:
                lines.append(f"| {name} | {other} | {extra:.4f} | {result.samples.get(name, '')} |")
    lines.append(f"| **mean** | | **{result.mean:.4f}** | |")
    return "\n".join(lines)
