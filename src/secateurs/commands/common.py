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
        help=f"merge results into MODEL/results.json (key '{key}'), for 'secateurs report' "
        "and the model card (MODEL/README.md)",
    )


def save_location(args: argparse.Namespace, model: str | None = None) -> Path | None:
    """The model directory ``--save`` writes into (checked before any work), or None."""
    if not args.save:
        return None
    model = model or args.model
    location = Path(resolve_model(model))
    if not location.is_dir():
        raise ConfigError(f"--save needs a model directory; {model!r} is not one.")
    _check_results_file(location)
    return location


def _check_results_file(location: Path) -> None:
    """A damaged results.json is reported now, not after the evaluation it would lose."""
    from secateurs.report import read_results

    read_results(location)


def save_dirs(args: argparse.Namespace, models: list[str]) -> dict[str, Path]:
    """Directories ``--save`` writes into: every model given as a directory (checked first)."""
    if not args.save:
        return {}
    dirs = {m: Path(m) for m in models if Path(m).expanduser().is_dir()}
    if not dirs:
        raise ConfigError(f"--save needs a model directory; none of {models} is one.")
    for location in dirs.values():
        _check_results_file(location)
    return dirs


def record_source(model: str) -> str | None:
    """The model a pruned directory came from (its record's ``source_model``), if recorded."""
    from secateurs.checkpoint import read_record

    record = read_record(model) if Path(model).expanduser().is_dir() else {}
    return record.get("source_model") or record.get("source")


def dense_of(model: str, sources: dict[str, str | None]) -> str | None:
    """Among the evaluated models (``sources``: model -> its record's source), the one
    ``model`` was pruned from, if it was given."""
    source = sources.get(model)
    if source is None:
        return None
    return next((m for m in sources if m != model and same_model(m, source)), None)


def same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def save_dense(location: Path, dense: str, values: dict[str, Any]) -> None:
    """Merge ``values`` into ``results.json``'s ``dense`` entry (the dense model a pruned run
    was compared with). An entry of another dense model is replaced, not mixed in."""
    from secateurs.report import read_results, save_results

    previous = read_results(location).get("dense") or {}
    kept = previous if previous.get("model") == dense else {}
    save_results(location, "dense", {**kept, "model": dense, **values})


def save_speed(saves: dict[str, Path], bench: dict[str, Any]) -> None:
    """Each measured directory's row of a ``secateurs bench`` result into its results.json
    (key ``speed``: the protocol and the model's entry, speedups against its baseline)."""
    from secateurs.report import save_results

    for entry in bench["models"]:
        location = saves.get(entry.get("source"))
        if location is not None:
            save_results(location, "speed", {"protocol": bench["protocol"], "model": entry})
