"""Flags shared by several commands, and small helpers to turn them into API arguments."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from secateurs.errors import ConfigError
from secateurs.models import DEFAULT_MODEL, resolve_model


def add_model_args(
    parser: argparse.ArgumentParser, positional: bool = True, several: bool = False
) -> None:
    """MODEL (or several MODELs), --dtype and --device."""
    what = f"HF directory, hub id, .gguf file or alias ({DEFAULT_MODEL})"
    parser.add_argument(
        "model",
        nargs="+" if several else ("?" if not positional else None),
        metavar="MODEL",
        default=DEFAULT_MODEL,
        help=f"one or more: {what}; evaluated one after another in this process"
        if several
        else what,
    )
    parser.add_argument(
        "--dtype",
        type=dtype_arg,
        default=None,
        help="float32 (default), bfloat16, float16, auto (the checkpoint's own)",
    )
    parser.add_argument(
        "--device", type=device_arg, default="cpu", help="cpu (default), cuda, cuda:1 ..."
    )


def dtype_arg(text: str) -> str:
    """argparse type of --dtype: one of ``models.DTYPES``, refused while parsing otherwise."""
    from secateurs.models import check_dtype_name

    return _argument(check_dtype_name, text)


def device_arg(text: str) -> str:
    """argparse type of --device: a device this machine has (cuda:N below the GPU count)."""
    from secateurs.models import check_device

    return _argument(check_device, text)


def _argument(check: Callable[[str], str], text: str) -> str:
    """argparse prints an ArgumentTypeError's own text (other errors as "invalid value")."""
    try:
        return check(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="local data directory (layout: docs/data.md). Default: $SECATEURS_DATA_DIR if set, "
        "else the Hugging Face hub",
    )


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def add_save_arg(parser: argparse.ArgumentParser, key: str) -> None:
    parser.add_argument(
        "--save",
        action="store_true",
        help=f"merge results into MODEL/results.json (key '{key}') for 'secateurs report'",
    )


def save_location(args: argparse.Namespace, model: str | None = None) -> Path | None:
    """The model directory ``--save`` writes into (checked before any work), or None."""
    if not args.save:
        return None
    model = model or args.model
    location = Path(resolve_model(model))
    if not location.is_dir():
        raise ConfigError(f"--save needs a model directory; {model!r} is not one.")
    return location
