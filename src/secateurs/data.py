"""Evaluation and calibration text: a local data directory first, the HF hub when reachable.

The data directory follows the layout of the project's offline data (``wikitext-2-raw/``,
``ptb/``, ``c4/`` ...). Set it with ``--data-dir`` or ``SECATEURS_DATA_DIR``. Nothing here
caches or copies the data.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from secateurs.errors import DataError
from secateurs.registry import Registry

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase as Tokenizer

log = logging.getLogger(__name__)

DATA_DIR_ENV = "SECATEURS_DATA_DIR"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The local data directory: ``explicit``, else ``$SECATEURS_DATA_DIR``, else none."""
    value = explicit or os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataError(
            f"Data directory {path} does not exist (from --data-dir or ${DATA_DIR_ENV})."
        )
    return path


@dataclass(frozen=True)
class EvalDataset:
    """A perplexity dataset: how to read its rows locally or from the hub, and how to join them."""

    name: str
    description: str
    default_split: str
    local: Callable[[Path, str], list[str]]
    hub: Callable[[str], list[str]]
    join: str = "\n\n"


DATASETS: Registry[EvalDataset] = Registry("dataset")


def read_text(path: Path) -> str:
    """The whole text of a (possibly gzipped) UTF-8 file, or a clear error naming it."""
    opener: Callable[..., IO[str]] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}). Convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path.name} > fixed.txt"
        ) from err
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"Cannot read {path}: {err}") from err


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"Expected data file {path} is missing.")
    return read_text(path).splitlines(keepends=True)


def _wikitext_local(root: Path, split: str) -> list[str]:
    if split != "test":
        raise DataError(f"Only the WikiText-2 test split is available locally, not {split!r}.")
    # HF rows: each line with its newline; whitespace-only lines become "".
    return [
        "" if not line.strip() else line
        for line in _read_lines(root / "wikitext-2-raw" / "wiki.test.raw")
    ]


def _wikitext_hub(split: str) -> list[str]:
    return _hub_column("wikitext", "wikitext-2-raw-v1", split, "text")


def _ptb_local(root: Path, split: str) -> list[str]:
    name = {"validation": "valid", "valid": "valid", "test": "test"}.get(split)
    if name is None:
        raise DataError(f"PTB split {split!r} is not available locally (validation, test).")
    return [line.strip() for line in _read_lines(root / "ptb" / f"ptb.{name}.txt")]


def _ptb_hub(split: str) -> list[str]:
    return [row.strip() for row in _hub_column("ptb_text_only", None, split, "sentence")]


C4_EVAL_DOCS = 1100  # SparseGPT/Wanda join validation[:1100]


def _c4_local(root: Path, split: str) -> list[str]:
    if split != "validation":
        raise DataError(f"Only a C4 validation subset is available locally, not {split!r}.")
    rows = [
        json.loads(line)["text"] for line in _read_lines(root / "c4" / "c4_validation_2k.jsonl")
    ]
    return rows[:C4_EVAL_DOCS]


def _c4_hub(split: str) -> list[str]:
    import datasets

    files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    ds = datasets.load_dataset("allenai/c4", data_files=files, split=split)
    return list(ds["text"][:C4_EVAL_DOCS])


def _hub_column(path: str, name: str | None, split: str, column: str) -> list[str]:
    import datasets

    return list(datasets.load_dataset(path, name, split=split)[column])


DATASETS.add(
    "wikitext2",
    EvalDataset(
        "wikitext2",
        "WikiText-2 raw (rows joined with blank lines)",
        "test",
        _wikitext_local,
        _wikitext_hub,
    ),
    aliases=("wikitext", "wikitext-2"),
)
DATASETS.add(
    "ptb",
    EvalDataset(
        "ptb",
        "Penn Treebank sentences (LLM-Pruner uses validation)",
        "validation",
        _ptb_local,
        _ptb_hub,
    ),
)
DATASETS.add(
    "c4",
    EvalDataset(
        "c4",
        f"C4-en validation, first {C4_EVAL_DOCS} docs joined with spaces",
        "validation",
        _c4_local,
        _c4_hub,
        join=" ",
    ),
)


@dataclass(frozen=True)
class EvalText:
    text: str
    dataset: str
    split: str
    source: str  # "local:<path>" or "hub"


def load_eval_text(
    name: str, split: str | None = None, data_root: str | os.PathLike | None = None
) -> EvalText:
    """The joined evaluation text of dataset ``name``, from the data directory or the hub."""
    dataset = DATASETS.get(name)
    split = split or dataset.default_split
    root = data_dir(data_root)
    if root is not None:
        rows, source = dataset.local(root, split), f"local:{root}"
    else:
        rows, source = _from_hub(dataset, split), "hub"
    text = dataset.join.join(rows)
    if not text.strip():
        raise DataError(f"Dataset {dataset.name} ({split}) is empty.")
    return EvalText(text, dataset.name, split, source)


HUB_HOST = ("huggingface.co", 443)
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick check (at most ``timeout`` s, DNS included) that the HF hub can be reached."""
    if any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in OFFLINE_ENV):
        return False
    result: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection(HUB_HOST, timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=connect, daemon=True)  # getaddrinfo ignores timeouts
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def require_data(what: str, data_root: str | os.PathLike | None = None) -> None:
    """Before loading a model: fail at once if ``what`` needs the hub and the hub is out of
    reach (instead of retrying for minutes after the load)."""
    if data_dir(data_root) is not None or hub_reachable():
        return
    raise DataError(
        f"{what} needs data: no local data directory is set (--data-dir or ${DATA_DIR_ENV}) and "
        "the Hugging Face hub cannot be reached. Point --data-dir at a folder with the layout "
        "described in docs/data.md."
    )


def _from_hub(dataset: EvalDataset, split: str) -> list[str]:
    try:
        return dataset.hub(split)
    except Exception as err:  # network, missing package, auth: all mean "not available here"
        raise DataError(
            f"No local data directory is set and {dataset.name} could not be loaded from the hub "
            f"({type(err).__name__}: {err}). Point --data-dir or ${DATA_DIR_ENV} at a folder "
            "with the data layout described in docs/data.md."
        ) from err


# --- calibration --------------------------------------------------------------------------------

C4_CALIBRATION = "c4/c4-sample.00000-of-00001.json.gz"
C4_VALIDATION = "c4/c4_validation_2k.jsonl"


def read_documents(path: Path) -> list[str]:
    """Documents of a calibration/training file: .txt (blank-line separated), .jsonl, .json(.gz)."""
    if not path.is_file():
        raise DataError(f"Calibration file {path} does not exist.")
    raw = read_text(path)
    stem_suffix = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
    if stem_suffix in (".jsonl", ".json"):
        docs = [_text_field(line, path) for line in raw.splitlines() if line.strip()]
    else:
        docs = [block.strip() for block in raw.split("\n\n")]
    docs = [doc for doc in docs if doc.strip()]
    if not docs:
        raise DataError(f"{path} holds no text.")
    return docs


def _text_field(line: str, path: Path) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: a line is not valid JSON ({err}).") from err
    if not isinstance(record, dict) or "text" not in record:
        raise DataError(f"{path}: each JSON line needs a 'text' field.")
    return record["text"]


def calibration_documents(
    source: str = "c4", data_root: str | os.PathLike | None = None
) -> list[str]:
    """Calibration documents: "c4" (the C4 sample minus the C4 eval docs) or a file path."""
    if source != "c4":
        return read_documents(Path(source).expanduser())
    root = data_dir(data_root)
    if root is None:
        return _c4_calibration_from_hub()
    docs = _records(root / C4_CALIBRATION)
    eval_urls = {r["url"] for r in _records(root / C4_VALIDATION)}
    kept = [r["text"] for r in docs if r.get("url") not in eval_urls]
    log.info(
        "C4 calibration: %d docs (%d dropped: also in C4 eval)", len(kept), len(docs) - len(kept)
    )
    return kept


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"Expected data file {path} is missing.")
    return [_json_line(line, path) for line in read_text(path).splitlines() if line.strip()]


def _json_line(line: str, path: Path) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: a line is not valid JSON ({err}).") from err


def _c4_calibration_from_hub() -> list[str]:
    try:
        import datasets

        files = {"train": "en/c4-train.00000-of-01024.json.gz"}
        return list(
            datasets.load_dataset("allenai/c4", data_files=files, split="train[:5000]")["text"]
        )
    except Exception as err:
        raise DataError(
            f"No local data directory is set and C4 could not be loaded from the hub ({err}). "
            f"Set --data-dir / ${DATA_DIR_ENV}, or pass --calibration FILE."
        ) from err


def sample_windows(
    tokenizer: Tokenizer, documents: list[str], n_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """``n_samples`` random ``seq_len``-token windows, one per random document long enough.

    Seeded with an explicit generator, so the same seed gives the same calibration set.
    """
    import torch

    if n_samples <= 0 or seq_len <= 1:
        raise DataError(f"Need n_samples > 0 and seq_len > 1; got {n_samples}, {seq_len}.")
    generator = torch.Generator().manual_seed(seed)
    windows = []
    for index in _shuffled(len(documents), generator):
        ids = tokenizer(documents[index], add_special_tokens=False)["input_ids"]
        if len(ids) <= seq_len:
            continue
        start = int(torch.randint(0, len(ids) - seq_len, (1,), generator=generator))
        windows.append(ids[start : start + seq_len])
        if len(windows) == n_samples:
            return torch.tensor(windows, dtype=torch.long)
    raise DataError(
        f"Only {len(windows)} of {len(documents)} documents are longer than {seq_len} tokens; "
        f"{n_samples} calibration samples were asked for. Use more text or shorter samples."
    )


def _shuffled(count: int, generator: torch.Generator) -> Iterator[int]:
    import torch

    yield from torch.randperm(count, generator=generator).tolist()


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration settings (Shortened LLaMA: 10 samples of 128 tokens), recorded with results."""

    source: str = "c4"
    n_samples: int = 10
    seq_len: int = 128
    seed: int = 0

    def load(
        self, tokenizer: Tokenizer, data_root: str | os.PathLike | None = None
    ) -> torch.Tensor:
        docs = calibration_documents(self.source, data_root)
        return sample_windows(tokenizer, docs, self.n_samples, self.seq_len, self.seed)
