"""Continued pretraining (CPT): full-parameter causal-LM training on packed text.

Shortened LLaMA found CPT on a corpus recovers severely pruned models far better than LoRA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel

from secateurs.recover.common import (
    StageResult,
    TrainConfig,
    restore_inference_settings,
    run_trainer,
)
from secateurs.recover.distributed import RecoveryTrainer


class CausalLMTrainer(RecoveryTrainer):
    """The HF Trainer; a named subclass so logs and checkpoints say what trained."""


def train_cpt(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    config: TrainConfig,
    work_dir: Path,
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[PreTrainedModel, StageResult]:
    """Train every parameter of ``model`` on ``blocks``; returns the trained model."""
    model.requires_grad_(True)
    model.train()
    trained, result = run_trainer(
        CausalLMTrainer,
        model,
        blocks,
        config,
        work_dir,
        method="cpt",
        resume=resume,
        device=device,
        progress=progress,
    )
    return restore_inference_settings(trained), result
