"""Recovery under ``accelerate launch``: what the launcher asked for, FSDP2 on CPU, whole models.

accelerate (1.15) turns its FSDP plugin on only for accelerator devices: with CPU processes
(gloo) the plugin is dropped and the model is silently wrapped in DDP. torch's FSDP2
(``fully_shard``) runs on CPU over gloo, so ``RecoveryTrainer`` switches the accelerator state
to FSDP when the launcher asked for FSDP2 and the processes run on CPU. FSDP1 (flat parameters,
which ``whole_model`` does not gather) is refused before the model is loaded.

DeepSpeed runs on CPU too (its CPU accelerator talks gloo), but accelerate starts it only for a
state created without ``cpu=True`` and with a backend: ``device_arguments`` asks for that.

After FSDP training every parameter is a shard (DTensor). ``whole_model`` gathers the full
weights on every process into an unsharded copy of the module tree (built on the meta device
before sharding, so it costs no memory), which is what saving, LoRA merging and the next stage
need.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys
from typing import Any

import torch
from transformers import Trainer

from secateurs.errors import ConfigError

log = logging.getLogger(__name__)

CPU_FSDP_CONFIG = "configs/accelerate/fsdp_cpu.yaml"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("true", "1", "yes")


def launcher_fsdp_version() -> int | None:
    """The FSDP version ``accelerate launch`` asked for (None: no FSDP)."""
    if not _env_flag("ACCELERATE_USE_FSDP"):
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def launcher_backend() -> str:
    """'fsdp1', 'fsdp2', 'deepspeed' or 'ddp' (also for a single process)."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    version = launcher_fsdp_version()
    return "ddp" if version is None else f"fsdp{version}"


def check_launch() -> None:
    """Refuse launcher settings this code cannot train with, before any model is loaded."""
    backend = launcher_backend()
    if backend == "fsdp1":
        raise ConfigError(
            "Recovery supports FSDP version 2 only (its DTensor shards are gathered into the "
            "saved model; FSDP1's flat parameters are not): set `fsdp_version: 2` in the "
            f"accelerate config, as configs/accelerate/fsdp.yaml and {CPU_FSDP_CONFIG} do."
        )
    if backend == "deepspeed" and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3":
        raise ConfigError(
            "DeepSpeed ZeRO-3 partitions the weights and recovery does not gather them for the "
            "saved model: use ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml) or FSDP2 "
            "(configs/accelerate/fsdp.yaml)."
        )
    if backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "The accelerate config asks for DeepSpeed, which is not installed: "
            "pip install 'secateurs[deepspeed]' (or launch with configs/accelerate/ddp.yaml)."
        )


def process_device(device: str) -> str:
    """'cuda' under a launcher means this process's GPU (LOCAL_RANK), not every process on GPU 0."""
    local_rank = os.environ.get("LOCAL_RANK")
    if str(device) == "cuda" and local_rank is not None:
        return f"cuda:{local_rank}"
    return str(device)


def device_arguments(device: str) -> dict[str, Any]:
    """TrainingArguments for ``device``: CPU DeepSpeed needs use_cpu off and gloo named."""
    on_cpu = str(device) == "cpu"
    if on_cpu and launcher_backend() == "deepspeed":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": on_cpu}


class RecoveryTrainer(Trainer):
    """The HF Trainer, with FSDP2 kept on when ``accelerate launch`` runs CPU processes."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if launcher_fsdp_version() == 2 and not self.is_fsdp_enabled:
            _switch_to_fsdp2(self)


def _switch_to_fsdp2(trainer: Trainer) -> None:
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # a single process, or a device accelerate already handles itself
    # the plugin accelerate built from the launcher's FSDP_* variables and then dropped
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    # as accelerate records it on GPUs: every later AcceleratorState() copies it from here
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    log.info("FSDP2 on %d CPU processes (gloo).", state.num_processes)


# --- whole models after sharded training --------------------------------------------------------


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s module tree whose parameters are on the meta device (no memory).

    Buffers are copied (rotary tables etc. are not in the state dict). Shared parameters stay
    shared, so tied embeddings remain tied.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        meta = torch.empty_like(param, device="meta")
        memo[id(param)] = torch.nn.Parameter(meta, requires_grad=param.requires_grad)
    return copy.deepcopy(model, memo)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every entry of ``model``'s state dict whole, on every process (a collective)."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, value in model.state_dict().items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # all processes call this in the same order
        state[name] = value.detach().to("cpu", copy=True)
    return state


def whole_model(trained: torch.nn.Module, skeleton: torch.nn.Module | None) -> torch.nn.Module:
    """``trained`` itself, or (when FSDP sharded it) its full weights in ``skeleton``."""
    if skeleton is None or not is_sharded(trained):
        return trained
    skeleton.load_state_dict(full_state_dict(trained), assign=True)
    if hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()  # assign=True put separate tensors under tied names
    return skeleton


def distributed_record(trainer: Trainer) -> dict[str, Any]:
    """How the stage was trained, read from the accelerator that trained it."""
    from accelerate.utils import DistributedType

    state = trainer.accelerator.state
    kind = state.distributed_type
    if kind == DistributedType.DEEPSPEED:
        backend = f"deepspeed-zero{state.deepspeed_plugin.zero_stage}"
    elif kind == DistributedType.FSDP:
        backend = f"fsdp{state.fsdp_plugin.fsdp_version}"
    else:
        backend = "single" if state.num_processes == 1 else "ddp"
    return {
        "backend": backend,
        "processes": state.num_processes,
        "device": str(state.device),
        "local_weight_fraction": round(local_weight_fraction(trainer.model), 4),
    }


def local_weight_fraction(model: torch.nn.Module) -> float:
    """The share of the model's weights this process holds (1 unsharded, ~1/N under FSDP)."""
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local / max(1, sum(p.numel() for p in params))


# --- the end of a launched run ------------------------------------------------------------------


def wait_for_every_process() -> None:
    """Hold every process until all reach this point (no-op outside a process group).

    Rank 0 saves the output while the others are done: without this, ``recover`` would return
    on rank 1 before the output it names exists.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    """Tear the process group down before the interpreter exits (``recover`` has already held
    every rank until the output was saved).

    A process that exits with gloo's process group alive can abort in its C++ destructors
    ("terminate called without an active exception", SIGABRT) while another rank still
    talks to it, which fails the whole launch after a successful run.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_launched_process(code: int = 0) -> None:
    """End a process that a distributed launcher started, now, without the interpreter's
    teardown (a no-op in a process of its own: the API and in-process callers go on).

    Called when a launched rank has nothing left to do (output saved, process group torn
    down, summary printed). Its C++ destructors can still abort at exit ("terminate called
    without an active exception", SIGABRT: a runtime thread destroyed while joinable) — seen
    on rank 1 of a two-process CPU run on a busy machine — and the launcher then fails the
    whole launch after a successful run. ``os._exit`` skips them; the streams are flushed first.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
