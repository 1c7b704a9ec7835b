"""Knowledge distillation from the dense original (teacher) into the pruned model (student).

loss = kl_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + lm_weight * CE,
averaged over tokens. The T^2 factor keeps gradient sizes comparable across temperatures
(Hinton et al.). Minitron distils with the KL term alone, hence ``lm_weight = 0`` by default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from secateurs.errors import ConfigError
from secateurs.recover.common import (
    StageResult,
    TrainConfig,
    restore_inference_settings,
    run_trainer,
)
from secateurs.recover.distributed import RecoveryTrainer


@dataclass(frozen=True)
class DistillSettings:
    temperature: float = 2.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"Distillation temperature must be positive; got {self.temperature}.")
        if self.kl_weight < 0 or self.lm_weight < 0 or self.kl_weight + self.lm_weight == 0:
            raise ConfigError("Distillation weights must be non-negative and not both zero.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distillation_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over tokens of T^2 * KL(teacher || student) on logits (..., vocab)."""
    vocab = student.size(-1)
    s = F.log_softmax(student.float().reshape(-1, vocab) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, vocab) / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")  # sum over vocab, mean over tokens
    return kl * temperature**2


class DistillTrainer(RecoveryTrainer):
    """Trainer whose loss is the teacher-student KL (plus an optional LM term)."""

    # compute_loss returns a per-micro-batch mean: let the Trainer divide by grad_accum.
    loss_is_scaled_for_ga = False

    def __init__(
        self, *args: Any, teacher: PreTrainedModel, settings: DistillSettings, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self.settings = settings
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"] if self.settings.lm_weight > 0 else None
        outputs = model(input_ids=inputs["input_ids"], labels=labels, use_cache=False)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=inputs["input_ids"], use_cache=False).logits
        loss = self.settings.kl_weight * distillation_kl(
            outputs.logits, teacher_logits, self.settings.temperature
        )
        if labels is not None:
            loss = loss + self.settings.lm_weight * outputs.loss
        return (loss, outputs) if return_outputs else loss


def check_teacher(student: PreTrainedModel, teacher: PreTrainedModel) -> None:
    s_vocab = student.get_output_embeddings().weight.shape[0]
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    if s_vocab != t_vocab:
        raise ConfigError(
            f"Teacher and student vocabularies differ ({t_vocab} vs {s_vocab}): distillation on "
            "logits needs the same tokenizer. Pass the dense original with --teacher."
        )


def train_distill(
    model: PreTrainedModel,
    teacher: PreTrainedModel,
    blocks: torch.Tensor,
    config: TrainConfig,
    work_dir: Path,
    settings: DistillSettings = DistillSettings(),
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[PreTrainedModel, StageResult]:
    """Train every parameter of the student ``model`` to match ``teacher``'s logits."""
    check_teacher(model, teacher)
    model.requires_grad_(True)
    model.train()
    trained, result = run_trainer(
        DistillTrainer,
        model,
        blocks,
        config,
        work_dir,
        method="distill",
        resume=resume,
        device=device,
        progress=progress,
        teacher=teacher,
        settings=settings,
    )
    result.extra = {"distill": settings.to_dict()}
    return restore_inference_settings(trained), result
