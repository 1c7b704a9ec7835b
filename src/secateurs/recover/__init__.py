"""Recovery after pruning: LoRA, continued pretraining (CPT), CPT then LoRA, distillation.

Thin over peft and the HF Trainer. ``recover`` is the one-call entry point (``secateurs
recover`` on the command line); ``train_lora`` / ``train_cpt`` / ``train_distill`` work on
in-memory models. Under ``accelerate launch`` the same calls train with DDP, FSDP2 or
DeepSpeed ZeRO-2 (``secateurs.recover.distributed``).
"""

from secateurs.recover.common import StageResult, TrainConfig, pack_documents, training_blocks
from secateurs.recover.cpt import train_cpt
from secateurs.recover.distill import DistillSettings, distillation_kl, train_distill
from secateurs.recover.distributed import end_process_group, exit_launched_process
from secateurs.recover.lora import LoraSettings, attach_lora, merge_lora, train_lora
from secateurs.recover.pipeline import (
    DEFAULT_LR,
    METHODS,
    RecoverSpec,
    RecoveryResult,
    recover,
    training_documents,
)

__all__ = [
    "DEFAULT_LR",
    "METHODS",
    "DistillSettings",
    "LoraSettings",
    "RecoverSpec",
    "RecoveryResult",
    "StageResult",
    "TrainConfig",
    "attach_lora",
    "distillation_kl",
    "end_process_group",
    "exit_launched_process",
    "merge_lora",
    "pack_documents",
    "recover",
    "train_cpt",
    "train_distill",
    "train_lora",
    "training_blocks",
    "training_documents",
]
