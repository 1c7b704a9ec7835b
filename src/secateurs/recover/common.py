"""Pieces every recovery method shares: settings, packed training text, the Trainer run.

Training text is tokenised document by document, joined with EOS and cut into fixed blocks of
``seq_len`` tokens (remainder dropped). The budget ``tokens`` fixes the number of optimizer
steps: ceil(tokens / (batch_size * seq_len * grad_accum * world_size)).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers import PreTrainedTokenizerBase as Tokenizer
from transformers.trainer_utils import get_last_checkpoint

from secateurs.errors import ConfigError, DataError, OutputExistsError
from secateurs.recover.distributed import (
    device_arguments,
    distributed_record,
    meta_skeleton,
    whole_model,
)

log = logging.getLogger(__name__)

BF16_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of one training stage (recorded with the result)."""

    tokens: int
    seq_len: int = 128
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.05  # fraction of steps (< 1) or a step count (>= 1)
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    bf16: str = "auto"  # auto: on where CUDA supports bf16
    gradient_checkpointing: bool = False
    save_steps: int = 200
    save_total_limit: int = 2
    log_steps: int | None = None  # default: about 50 points on the loss curve
    seed: int = 0
    max_steps: int | None = None  # stop early (tests, or to interrupt on purpose)

    def __post_init__(self) -> None:
        sizes = dict(seq_len=self.seq_len, batch_size=self.batch_size, grad_accum=self.grad_accum)
        for name, value in sizes.items():
            if value <= 0:
                raise ConfigError(f"{name} must be positive; got {value}.")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2; got {self.seq_len}.")
        if self.lr <= 0 or self.warmup < 0 or self.save_steps <= 0:
            raise ConfigError("lr and save_steps must be positive, warmup non-negative.")
        if self.bf16 not in BF16_CHOICES:
            raise ConfigError(f"bf16 must be one of {BF16_CHOICES}; got {self.bf16!r}.")
        if self.tokens < self.tokens_per_step:
            raise ConfigError(
                f"A budget of {self.tokens:,} tokens is smaller than one optimizer step "
                f"(batch {self.batch_size} x seq_len {self.seq_len} x grad_accum {self.grad_accum}"
                f" x {world_size()} process(es) = {self.tokens_per_step:,} tokens). "
                "Raise --tokens or lower the batch size / sequence length."
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum * world_size()

    @property
    def steps(self) -> int:
        return math.ceil(self.tokens / self.tokens_per_step)

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), steps=self.steps, tokens_per_step=self.tokens_per_step)


def world_size() -> int:
    """Processes started by ``accelerate launch`` / torchrun (1 in a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


# --- data ---------------------------------------------------------------------------------------


def pack_documents(
    tokenizer: Tokenizer, documents: list[str], seq_len: int, max_blocks: int | None = None
) -> torch.Tensor:
    """Blocks (N, seq_len) of the documents' tokens joined with EOS; remainder dropped.

    Stops tokenising once ``max_blocks`` blocks are filled, so a small budget over a big
    corpus costs little.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        log.warning("The tokenizer has no EOS token: documents are packed without a separator.")
    stream: list[int] = []
    needed = None if max_blocks is None else max_blocks * seq_len
    for ids in _token_lists(tokenizer, documents):
        stream.extend(ids if eos is None else [*ids, eos])
        if needed is not None and len(stream) >= needed:
            break
    count = len(stream) // seq_len
    if max_blocks is not None:
        count = min(count, max_blocks)
    if count == 0:
        raise DataError(
            f"The training text has {len(stream)} tokens: fewer than one {seq_len}-token block."
        )
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _token_lists(
    tokenizer: Tokenizer, documents: list[str], chunk: int = 64
) -> Iterator[list[int]]:
    for start in range(0, len(documents), chunk):
        batch = documents[start : start + chunk]
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


class PackedBlocks(Dataset):
    """Causal-LM examples from packed blocks; the model shifts the labels itself."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        block = self.blocks[index]
        return {"input_ids": block, "labels": block}


def training_blocks(
    tokenizer: Tokenizer, documents: list[str], config: TrainConfig
) -> torch.Tensor:
    """Exactly the blocks the budget needs; a short text is repeated to fill it."""
    needed = config.steps * config.batch_size * config.grad_accum * world_size()
    blocks = pack_documents(tokenizer, documents, config.seq_len, max_blocks=needed)
    if len(blocks) < needed:
        log.warning(
            "The training text gives %d blocks of %d tokens; the budget needs %d: it is repeated "
            "about %.1f times.",
            len(blocks),
            config.seq_len,
            needed,
            needed / len(blocks),
        )
        # whole passes in order, so every optimizer step sees a full batch
        blocks = blocks.repeat(math.ceil(needed / len(blocks)), 1)[:needed]
    return blocks


# --- the Trainer run ----------------------------------------------------------------------------


@dataclass
class StageResult:
    """What one training stage did (the recovery record's per-stage entry)."""

    method: str
    config: dict[str, Any]
    global_step: int
    tokens_seen: int
    wall_s: float
    tokens_per_s: float
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bf16_enabled(setting: str, device: str) -> bool:
    """bf16 mixed precision: 'on', 'off', or 'auto' (on where the CUDA device supports it)."""
    if setting == "on":
        return True
    if setting == "off" or not str(device).startswith("cuda"):
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def training_arguments(
    config: TrainConfig, work_dir: Path, device: str = "cpu", progress: bool = True
) -> TrainingArguments:
    steps = config.max_steps or config.steps
    log_steps = config.log_steps or max(1, config.steps // 50)
    return TrainingArguments(
        output_dir=str(work_dir),
        max_steps=steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        # schedule over the whole budget, also when max_steps stops earlier
        warmup_steps=warmup_steps(config),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16_enabled(config.bf16, device),
        # transformers 5 name for gradient checkpointing; non-reentrant works with frozen inputs
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        logging_steps=log_steps,
        logging_first_step=True,
        include_num_input_tokens_seen="all",
        seed=config.seed,
        data_seed=config.seed,
        **device_arguments(device),
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        remove_unused_columns=False,
    )


def warmup_steps(config: TrainConfig) -> int:
    if config.warmup >= 1:
        return int(config.warmup)
    return math.ceil(config.warmup * config.steps)


def _scheduler_total(trainer: Trainer, config: TrainConfig) -> None:
    """Keep the cosine schedule sized to the full budget when ``max_steps`` stops early."""
    if config.max_steps is None or config.max_steps == config.steps:
        return
    original = trainer.create_scheduler

    def create_scheduler(num_training_steps: int, optimizer=None):
        return original(config.steps, optimizer)

    trainer.create_scheduler = create_scheduler


def resume_point(work_dir: Path, resume: bool) -> str | None:
    """The last Trainer checkpoint to resume from; refuse to silently restart over one."""
    last = get_last_checkpoint(str(work_dir)) if work_dir.is_dir() else None
    if last is not None and not resume:
        raise OutputExistsError(
            f"{work_dir} holds checkpoints of an interrupted run ({Path(last).name}); pass "
            "--resume (from Python: resume=True) to continue it, or delete that directory to "
            "start over."
        )
    if resume and last is None:
        log.info("Nothing to resume in %s: starting from step 0.", work_dir)
    return last


def run_trainer(
    trainer_cls: type[Trainer],
    model: PreTrainedModel,
    blocks: torch.Tensor,
    config: TrainConfig,
    work_dir: Path,
    *,
    method: str,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    **trainer_kwargs: Any,
) -> tuple[torch.nn.Module, StageResult]:
    """Train ``model`` on ``blocks`` with ``trainer_cls``; checkpoints go to ``work_dir``.

    Returns the trained model unwrapped and whole (gathered from the shards after FSDP).
    """
    work_dir = Path(work_dir)
    checkpoint = resume_point(work_dir, resume)
    args = training_arguments(config, work_dir, device, progress)
    dataset = PackedBlocks(blocks)
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, **trainer_kwargs)
    # FSDP shards `model` in place: keep its module tree to rebuild it whole afterwards
    skeleton = meta_skeleton(model) if trainer.is_fsdp_enabled else None
    _scheduler_total(trainer, config)
    log.info(
        "%s: %d steps of %d tokens (%s)%s",
        method,
        args.max_steps,
        config.tokens_per_step,
        work_dir,
        f", resuming from {Path(checkpoint).name}" if checkpoint else "",
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    result = _stage_result(trainer, config, method, time.perf_counter() - start, checkpoint)
    result.config["precision"] = "bf16 mixed" if args.bf16 else "fp32"  # what 'auto' became
    result.config["distributed"] = distributed_record(trainer)
    trained = whole_model(trainer.accelerator.unwrap_model(trainer.model), skeleton)
    return trained, result


def _stage_result(
    trainer: Trainer, config: TrainConfig, method: str, seconds: float, checkpoint: str | None
) -> StageResult:
    state = trainer.state
    resumed_step = int(Path(checkpoint).name.split("-")[-1]) if checkpoint else 0
    session_tokens = (state.global_step - resumed_step) * config.tokens_per_step
    return StageResult(
        method=method,
        config=config.to_dict(),
        global_step=state.global_step,
        tokens_seen=state.global_step * config.tokens_per_step,
        wall_s=round(seconds, 3),
        tokens_per_s=round(session_tokens / seconds, 1) if seconds > 0 else 0.0,
        loss_curve=loss_curve(state.log_history, config.tokens_per_step),
        resumed_from=checkpoint,
    )


def loss_curve(log_history: list[dict[str, Any]], tokens_per_step: int) -> list[dict[str, float]]:
    """(step, tokens, loss, lr) points from the Trainer's log history (kept across resumes)."""
    points = []
    for entry in log_history:
        if "loss" in entry:
            step = int(entry["step"])
            points.append(
                {
                    "step": step,
                    "tokens": step * tokens_per_step,
                    "loss": float(entry["loss"]),
                    "lr": float(entry.get("learning_rate", 0.0)),
                }
            )
    return points


def restore_inference_settings(model: PreTrainedModel) -> PreTrainedModel:
    """Undo training-time switches so the saved model behaves like the input."""
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = True
    return model.eval()
