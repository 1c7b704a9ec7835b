"""``secateurs recover``: retrain a pruned checkpoint (LoRA, CPT, CPT then LoRA, distillation)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from secateurs.commands.base import Command, register
from secateurs.commands.common import add_data_args, device_arg
from secateurs.errors import ConfigError

if TYPE_CHECKING:  # imported when the command runs: peft/transformers are slow to import
    from secateurs.recover import DistillSettings, LoraSettings, TrainConfig


def _lib():
    import secateurs.recover

    return secateurs.recover


@register
class Recover(Command):
    path = ("recover",)
    help = "retrain a pruned model and save it merged (standard checkpoint + recovery record)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("pruned", help="pruned model directory (from 'secateurs prune')")
        methods = ", ".join(_lib().METHODS.names())
        parser.add_argument("--method", default="lora", help=f"one of: {methods}")
        parser.add_argument(
            "--data",
            default="c4",
            help="'c4' (local C4 sample minus C4 eval docs), a .txt/.jsonl/"
            ".json.gz file, or hub:NAME[:CONFIG]",
        )
        parser.add_argument("--tokens", type=int, required=True, help="training budget in tokens")
        parser.add_argument("--out", type=Path, required=True, help="output directory")
        parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
        parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
        parser.add_argument("--work-dir", type=Path, help="Trainer checkpoints (default: OUT.work)")
        parser.add_argument("--keep-work", action="store_true", help="keep the work dir at the end")
        parser.add_argument(
            "--device", type=device_arg, default="cpu", help="cpu (default), cuda, cuda:1 ..."
        )
        _add_training_args(parser)
        _add_lora_args(parser)
        _add_distill_args(parser)
        add_data_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        method = _lib().METHODS.canonical(args.method)
        first = "distill" if method == "distill" else _lib().METHODS.get(method)[0]
        train = _train_config(args, args.tokens, args.lr or _lib().DEFAULT_LR[first])
        lora_train = None
        if method == "cpt+lora":
            if args.lora_tokens is None:
                raise ConfigError("cpt+lora needs a budget for each stage: add --lora-tokens N.")
            lora_train = _train_config(
                args, args.lora_tokens, args.lora_lr or _lib().DEFAULT_LR["lora"]
            )
        spec = _lib().RecoverSpec(
            train,
            method=method,
            data=args.data,
            lora_train=lora_train,
            lora=_lora_settings(args),
            distill=_distill_settings(args),
            teacher=args.teacher,
            data_root=args.data_dir,
            device=args.device,
        )
        result = _lib().recover(
            args.pruned,
            args.out,
            spec,
            work_dir=args.work_dir,
            resume=args.resume,
            overwrite=args.overwrite,
            keep_work=args.keep_work,
        )
        _lib().end_process_group()  # a launched process exits cleanly only without it
        if int(os.environ.get("RANK", "0")) == 0:  # under a launcher, rank 0 saves and reports
            _summary(result.record["recovery"], result.out)
            if not result.finished:
                print(
                    "stopped before the budget was spent (--max-steps): nothing saved yet; "
                    "run the same command with --resume to finish"
                )
        _lib().exit_launched_process(0)  # launched: done, without teardown aborts
        return 0


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--seq-len", type=int, default=128)
    group.add_argument("--batch-size", type=int, default=8, help="per device")
    group.add_argument("--grad-accum", type=int, default=1)
    lrs = ", ".join(f"{k} {v:g}" for k, v in _lib().DEFAULT_LR.items())
    group.add_argument("--lr", type=float, default=None, help=f"default per method: {lrs}")
    group.add_argument(
        "--warmup", type=float, default=0.05, help="fraction of steps, or steps if >= 1"
    )
    group.add_argument("--scheduler", default="cosine", help="HF scheduler (cosine, linear ...)")
    group.add_argument("--weight-decay", type=float, default=0.0)
    group.add_argument(
        "--bf16",
        default="auto",
        choices=("auto", "on", "off"),
        help="bf16 mixed precision (auto: where the CUDA device supports it)",
    )
    group.add_argument("--gradient-checkpointing", action="store_true")
    group.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    group.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after N steps (schedule still spans the budget; --resume later)",
    )
    group.add_argument("--seed", type=int, default=0)


def _add_lora_args(parser: argparse.ArgumentParser) -> None:
    defaults = _lib().LoraSettings()
    group = parser.add_argument_group("lora (lora, cpt+lora)")
    group.add_argument("--lora-tokens", type=int, default=None, help="cpt+lora: LoRA stage budget")
    group.add_argument("--lora-lr", type=float, default=None, help="cpt+lora: LoRA stage lr")
    group.add_argument("--lora-r", type=int, default=defaults.r)
    group.add_argument("--lora-alpha", type=int, default=defaults.alpha)
    group.add_argument("--lora-dropout", type=float, default=defaults.dropout)
    group.add_argument(
        "--lora-targets",
        default=defaults.target_modules,
        help="'all-linear' or comma-separated module names (q_proj,v_proj ...)",
    )


def _add_distill_args(parser: argparse.ArgumentParser) -> None:
    defaults = _lib().DistillSettings()
    group = parser.add_argument_group("distill")
    group.add_argument(
        "--teacher",
        default=None,
        help="dense teacher (default: source_model of the pruned secateurs.json)",
    )
    group.add_argument("--temperature", type=float, default=defaults.temperature)
    group.add_argument("--kl-weight", type=float, default=defaults.kl_weight)
    group.add_argument("--lm-weight", type=float, default=defaults.lm_weight)


def _train_config(args: argparse.Namespace, tokens: int, lr: float) -> TrainConfig:
    return _lib().TrainConfig(
        tokens=tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=lr,
        warmup=args.warmup,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        save_steps=args.save_steps,
        seed=args.seed,
        max_steps=args.max_steps,
    )


def _lora_settings(args: argparse.Namespace) -> LoraSettings:
    targets = args.lora_targets
    if targets != "all-linear":
        targets = tuple(t.strip() for t in str(targets).split(",") if t.strip())
    return _lib().LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout, targets)


def _distill_settings(args: argparse.Namespace) -> DistillSettings:
    return _lib().DistillSettings(args.temperature, args.kl_weight, args.lm_weight)


def _summary(recovery: dict, out: Path | None) -> None:
    curve = recovery["loss_curve"]
    loss = f"{curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f}" if curve else "n/a"
    print(f"method: {recovery['method']}  tokens seen: {recovery['tokens_seen']:,}")
    print(f"training loss: {loss}")
    print(f"wall: {recovery['wall_s']:.1f} s  throughput: {recovery['tokens_per_s']:,.0f} tokens/s")
    print(f"saved: {out}")
