import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import tiny_model, tiny_tokenizer, word_text  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A saved tiny LLaMA with its tokenizer, as a user's local checkpoint directory."""
    path = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def calibration_file(tmp_path):
    """A .txt calibration file: 12 documents of 60 words, separated by blank lines."""
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(word_text(60, seed=s) for s in range(12)))
    return path


@pytest.fixture
def llama():
    return tiny_model("llama")


@pytest.fixture
def data_dir(tmp_path):
    """A data directory in the shared layout, with small synthetic WikiText-2 and PTB files."""
    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    (root / "ptb").mkdir()
    lines = [" \n", " = w5 w6 = \n", " \n"] + [word_text(30, seed=s) + " \n" for s in range(20)]
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text("".join(lines))
    (root / "ptb" / "ptb.valid.txt").write_text(
        "".join(f" {word_text(12, s)}\n" for s in range(40))
    )
    return root
