"""``recover``: load a pruned checkpoint, retrain it, save a merged standard checkpoint.

Everything that can fail on bad input (output exists, stale work dir, data, budget, teacher)
is checked before the first training step. The output directory appears only when complete;
Trainer checkpoints live in a separate work directory so an interrupted run can resume.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

from secateurs.card import write_card
from secateurs.checkpoint import (
    RECORD_FILE,
    atomic_directory,
    check_output_dir,
    read_record,
    write_json,
)
from secateurs.data import calibration_documents, data_dir, read_documents
from secateurs.errors import ConfigError, DataError
from secateurs.models import load_model
from secateurs.plan import RECORD_KEYS
from secateurs.recover.common import StageResult, TrainConfig, resume_point, training_blocks
from secateurs.recover.cpt import train_cpt
from secateurs.recover.distill import DistillSettings, train_distill
from secateurs.recover.distributed import check_launch, process_device, wait_for_every_process
from secateurs.recover.lora import LoraSettings, train_lora
from secateurs.registry import Registry
from secateurs.writer import save_checkpoint

log = logging.getLogger(__name__)

# method -> its stages, run in order
METHODS: Registry[tuple[str, ...]] = Registry("recovery method")
METHODS.add("lora", ("lora",))
METHODS.add("cpt", ("cpt",))
METHODS.add("cpt+lora", ("cpt", "lora"), aliases=("cpt-lora", "cpt->lora"))
METHODS.add("distill", ("distill",), aliases=("kd", "distillation"))

# Learning rates per stage when none is given: LoRA as Shortened LLaMA (1e-4 there, with far more
# steps; 2e-4 is the usual LoRA choice for short runs), full-parameter stages lower.
DEFAULT_LR = {"lora": 2e-4, "cpt": 5e-5, "distill": 5e-5}

EVAL_FILES = ("wikitext-2-raw", "ptb", "c4_validation_2k")


@dataclass
class RecoveryResult:
    model: PreTrainedModel
    record: dict[str, Any]
    stages: list[StageResult] = field(default_factory=list)
    out: Path | None = None
    finished: bool = True  # False: stopped early (max_steps); the work dir holds the state


# --- data ---------------------------------------------------------------------------------------


def training_documents(
    source: str, data_root: str | os.PathLike | None = None, max_docs: int | None = None
) -> list[str]:
    """Training text: 'c4' (local C4 sample minus C4 eval docs), a file, or hub:NAME[:CONFIG]."""
    if source.startswith("hub:"):
        return _hub_documents(source[4:], max_docs)
    if source == "c4":
        return calibration_documents("c4", data_root)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"Training data {path} does not exist. Pass 'c4', a .txt/.jsonl/.json(.gz) file, "
            "or hub:NAME[:CONFIG] for a hub dataset with a 'text' column."
        )
    _warn_if_eval_text(path, data_root)
    return read_documents(path)


def _warn_if_eval_text(path: Path, data_root: str | os.PathLike | None) -> None:
    root = data_dir(data_root)
    resolved = path.resolve()
    if (
        root is not None
        and resolved.is_relative_to(root.resolve())
        and any(part in str(resolved) for part in EVAL_FILES)
    ):
        log.warning("%s is evaluation text: perplexity on it after training is not honest.", path)


def _hub_documents(spec: str, max_docs: int | None) -> list[str]:
    name, _, config = spec.partition(":")
    try:
        import datasets

        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
        rows = stream.take(max_docs) if max_docs else stream
        docs = [row["text"] for row in rows]
    except Exception as err:  # network, auth, missing column: the data is not usable here
        reason = f"{type(err).__name__}: {err}"
        raise DataError(f"Hub dataset {spec!r} could not be read ({reason}).") from err
    docs = [doc for doc in docs if doc and doc.strip()]
    if not docs:
        raise DataError(f"Hub dataset {spec!r} holds no text.")
    return docs


# --- the run ------------------------------------------------------------------------------------


def default_work_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.work")


def stage_configs(
    method: str, train: TrainConfig, lora_train: TrainConfig | None
) -> dict[str, TrainConfig]:
    """The TrainConfig of every stage of ``method`` (cpt+lora: ``lora_train`` for LoRA)."""
    stages = METHODS.get(method)
    configs = {stage: train for stage in stages}
    if "cpt" in stages and "lora" in stages:
        if lora_train is None:
            raise ConfigError("cpt+lora needs a separate LoRA budget (--lora-tokens).")
        configs["lora"] = lora_train
    return configs


@dataclass(frozen=True)
class RecoverSpec:
    """What a recovery run does: ``method`` ("lora", "cpt", "cpt+lora", "distill") on
    ``data`` ("c4" or a text file) with the ``train`` budget (and ``lora_train`` for the LoRA
    stage of cpt+lora), LoRA and distillation settings, a ``teacher`` (distill; default: the
    pruned model's source), where named data is read (``data_root``) and the ``device``."""

    train: TrainConfig
    method: str = "lora"
    data: str = "c4"
    lora_train: TrainConfig | None = None
    lora: LoraSettings | None = None
    distill: DistillSettings | None = None
    teacher: str | None = None
    data_root: str | os.PathLike | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", METHODS.canonical(self.method))
        stage_configs(self.method, self.train, self.lora_train)  # a missing budget: refused now


def recover(
    pruned: str | os.PathLike,
    out: str | os.PathLike | None = None,
    spec: RecoverSpec | None = None,
    *,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    **options: Any,
) -> RecoveryResult:
    """Retrain the pruned checkpoint ``pruned`` as ``spec`` (or the ``RecoverSpec`` fields
    given as ``options``) says, and save it merged to ``out``; ``work_dir`` holds the
    resumable stages (default: beside ``out``)."""
    spec = spec if spec is not None else RecoverSpec(**options)
    configs = stage_configs(spec.method, spec.train, spec.lora_train)
    check_launch()
    device = process_device(spec.device)
    if out is not None and _is_main_process():  # one writer: the main process claims `out`
        check_output_dir(out, overwrite)
    work = Path(work_dir) if work_dir else default_work_dir(out or "secateurs-recover")
    for stage in configs:  # a stale work dir without --resume: refuse before loading anything
        resume_point(work / stage, resume)
    record = _input_record(pruned)
    run = _Inputs.load(pruned, spec, configs, record, device)
    start = time.perf_counter()
    settings = dict(
        lora=spec.lora or LoraSettings(),
        distill=spec.distill or DistillSettings(),
        teacher=run.teacher,
        resume=resume,
        device=device,
        progress=progress,
    )
    model, stages = _run_stages(
        run.model, run.tokenizer, record, configs, run.blocks, work, settings
    )
    info = dict(method=spec.method, data=spec.data, documents=run.documents,
                teacher=run.teacher_name, wall_s=time.perf_counter() - start)  # fmt: skip
    full_record = recovery_record(record, stages, info)
    return _finish(
        model, run.tokenizer, (full_record, stages, configs), out, (overwrite, keep_work, work)
    )


@dataclass
class _Inputs:
    """The pruned model, its training blocks per stage and the teacher, loaded."""

    model: Any
    tokenizer: Any
    blocks: dict[str, Any]
    documents: int
    teacher: Any
    teacher_name: str | None

    @classmethod
    def load(cls, pruned, spec: RecoverSpec, configs, record, device) -> _Inputs:
        teacher_name = _teacher_name(spec.method, spec.teacher, record)
        model, tokenizer = load_model(pruned, device=device)
        need = max(c.tokens for c in configs.values())
        docs = training_documents(spec.data, spec.data_root, max_docs=math.ceil(need / 32))
        blocks = {s: training_blocks(tokenizer, docs, c) for s, c in configs.items()}
        teacher = load_model(teacher_name, device=device)[0] if teacher_name else None
        return cls(model, tokenizer, blocks, len(docs), teacher, teacher_name)


def _finish(model, tokenizer, result: tuple, out, how: tuple) -> RecoveryResult:
    """Save the merged model if every stage spent its budget (every rank returns once the
    output exists)."""
    full_record, stages, configs = result
    overwrite, keep_work, work = how
    finished = len(stages) == len(configs) and all(
        s.global_step >= configs[s.method].steps for s in stages
    )
    if not finished:
        wait_for_every_process()
        return RecoveryResult(model, full_record, stages, None, finished=False)
    if out is not None and _is_main_process():
        save_recovered(model, tokenizer, out, full_record, overwrite=overwrite)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    wait_for_every_process()
    return RecoveryResult(model, full_record, stages, Path(out) if out else None)


def _input_record(pruned: str | os.PathLike) -> dict[str, Any]:
    record = read_record(pruned) if Path(pruned).is_dir() else {}
    if not any(key in record for key in RECORD_KEYS):  # any version of secateurs prune
        log.warning(
            "%s has no secateurs pruning record (%s): it looks like an unpruned model. "
            "Recovering it anyway.",
            pruned,
            RECORD_FILE,
        )
    return {k: v for k, v in record.items() if k not in ("structure", "loading")}


def _teacher_name(method: str, teacher: str | None, record: dict[str, Any]) -> str | None:
    if "distill" not in METHODS.get(method):
        return None
    name = teacher or record.get("source_model")
    if not name:
        raise ConfigError(
            "Distillation needs the dense original as teacher: pass --teacher MODEL (the pruned "
            f"directory's {RECORD_FILE} names no source_model)."
        )
    return str(name)


def _run_stages(
    model: PreTrainedModel,
    tokenizer: Tokenizer,
    record: dict[str, Any],
    configs: dict[str, TrainConfig],
    blocks: dict[str, Any],
    work: Path,
    options: dict[str, Any],
) -> tuple[PreTrainedModel, list[StageResult]]:
    stages: list[StageResult] = []
    names = list(configs)
    for index, stage in enumerate(names):
        done = work / f"{stage}-model"
        if index < len(names) - 1 and (done / RECORD_FILE).is_file() and options["resume"]:
            log.info("Stage %s already finished in %s: reusing it.", stage, done)
            model, _ = load_model(done, device=options["device"])
            stages.append(StageResult(**read_record(done)["stage_result"]))
            continue
        model, result = _train_stage(
            stage, model, configs[stage], blocks[stage], work / stage, options
        )
        stages.append(result)
        if result.global_step < configs[stage].steps:  # stopped by max_steps: not finished
            log.warning(
                "Stage %s stopped at step %d of %d; run again with --resume to finish. "
                "Checkpoints are in %s.",
                stage,
                result.global_step,
                configs[stage].steps,
                work,
            )
            break
        if index < len(names) - 1 and _is_main_process():  # resumable hand-over to the next stage
            save_checkpoint(
                model, tokenizer, done, dict(record, stage_result=result.to_dict()), overwrite=True
            )
    return model, stages


def _train_stage(stage, model, config, blocks, work, options):
    common = dict(resume=options["resume"], device=options["device"], progress=options["progress"])
    if stage == "lora":
        return train_lora(model, blocks, config, work, options["lora"], **common)
    if stage == "cpt":
        return train_cpt(model, blocks, config, work, **common)
    teacher, settings = options["teacher"], options["distill"]
    return train_distill(model, teacher, blocks, config, work, settings, **common)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --- record and output --------------------------------------------------------------------------


def recovery_record(
    record: dict[str, Any], stages: list[StageResult], info: dict[str, Any]
) -> dict[str, Any]:
    """The input record plus a ``recovery`` entry (an earlier one goes to previous_recoveries)."""
    record = dict(record)
    if "recovery" in record:
        earlier = record.pop("recovery")
        record["previous_recoveries"] = [*record.get("previous_recoveries", []), earlier]
    tokens = sum(s.tokens_seen for s in stages)
    train_s = sum(s.wall_s for s in stages)
    record["recovery"] = {
        "method": info["method"],
        "data": {"source": info["data"], "documents": info["documents"]},
        "teacher": info["teacher"],
        "tokens_seen": tokens,
        "hyperparameters": {s.method: {**s.config, **s.extra} for s in stages},
        "stages": [s.to_dict() for s in stages],
        "loss_curve": [dict(p, stage=s.method) for s in stages for p in s.loss_curve],
        "wall_s": round(info["wall_s"], 3),
        "tokens_per_s": round(sum(s.tokens_per_s * s.wall_s for s in stages) / train_s, 1)
        if train_s > 0
        else 0.0,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return record


def save_recovered(
    model: PreTrainedModel,
    tokenizer: Tokenizer | None,
    out: str | os.PathLike,
    record: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """Save the checkpoint plus ``loss_curve.json`` / ``.png`` to ``out``, all or nothing."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        staged = save_checkpoint(model, tokenizer, tmp / "checkpoint", record)
        for item in staged.iterdir():
            item.rename(tmp / item.name)
        staged.rmdir()
        if any(record.get(key) for key in RECORD_KEYS):  # the staged card says "checkpoint"
            write_card(tmp, name=Path(out).name)
        curve = record["recovery"]["loss_curve"]
        write_json(tmp / "loss_curve.json", curve)
        title = f"recovery: {record['recovery']['method']}"
        plot_loss_curve(curve, tmp / "loss_curve.png", title=title)
    log.info("Recovered model saved to %s", out)
    return Path(out)


def plot_loss_curve(curve: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Training loss against tokens seen, one line per stage."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    offset = 0
    for stage in dict.fromkeys(p["stage"] for p in curve):
        points = [p for p in curve if p["stage"] == stage]
        axes.plot(
            [offset + p["tokens"] for p in points],
            [p["loss"] for p in points],
            marker=".",
            label=stage,
        )
        offset += points[-1]["tokens"]
    axes.set_xlabel("training tokens seen")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
