"""LoRA recovery with peft, merged into the base weights before saving.

Shortened LLaMA's defaults: rank 8 on every linear layer of the decoder (q, k, v, o, gate, up,
down for LLaMA), alpha 16, dropout 0.05. ``all-linear`` picks those for any architecture
(peft leaves the output head out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, set_seed

from secateurs.errors import ConfigError
from secateurs.recover.common import (
    StageResult,
    TrainConfig,
    restore_inference_settings,
    run_trainer,
)
from secateurs.recover.cpt import CausalLMTrainer


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(
                f"LoRA rank and alpha must be positive; got r={self.r}, alpha={self.alpha}."
            )
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1); got {self.dropout}.")
        if not self.target_modules:
            raise ConfigError("LoRA needs target modules (e.g. 'all-linear' or q_proj,v_proj).")

    def peft_config(self) -> LoraConfig:
        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            task_type="CAUSAL_LM",
            target_modules=targets if isinstance(targets, str) else list(targets),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not isinstance(self.target_modules, str):
            data["target_modules"] = list(self.target_modules)
        return data


def attach_lora(model: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with trainable LoRA adapters; the base weights are frozen."""
    try:
        return get_peft_model(model, settings.peft_config())
    except ValueError as err:  # peft's message for target modules that match nothing
        raise ConfigError(f"LoRA could not attach to this model: {err}") from err


def merge_lora(peft_model: PeftModel) -> PreTrainedModel:
    """Fold the adapters into the base weights: a plain model with the same outputs."""
    return peft_model.merge_and_unload()


def train_lora(
    model: PreTrainedModel,
    blocks: torch.Tensor,
    config: TrainConfig,
    work_dir: Path,
    settings: LoraSettings = LoraSettings(),
    *,
    resume: bool = False,
    device: str = "cpu",
    progress: bool = True,
    merge: bool = True,
) -> tuple[PreTrainedModel, StageResult]:
    """Train LoRA adapters on ``blocks``; returns the merged model (or the PeftModel)."""
    # seeded adapters: reproducible runs, and the same start on every process (FSDP shards
    # each process's own copy, so different random starts would be silently mixed)
    set_seed(config.seed)
    peft_model = attach_lora(model, settings)
    peft_model.train()
    if config.gradient_checkpointing:
        peft_model.enable_input_require_grads()  # frozen embeddings would cut the graph
    trained, result = run_trainer(
        CausalLMTrainer,
        peft_model,
        blocks,
        config,
        work_dir,
        method="lora",
        resume=resume,
        device=device,
        progress=progress,
    )
    trainable, total = peft_model.get_nb_trainable_parameters()
    result.extra = {
        "lora": settings.to_dict(),
        "trainable_parameters": trainable,
        "all_parameters": total,
    }
    if not merge:
        return trained, result
    return restore_inference_settings(merge_lora(trained)), result
