"""Perplexity protocol: windows, BOS policies, and a known answer."""

import math

import pytest
import torch

from secateurs.data import DATA_DIR_ENV, load_eval_text
from secateurs.errors import ConfigError, DataError
from secateurs.evaluate.ppl import PPLProtocol, perplexity, windows_of
from tiny_models import VOCAB, tiny_model

IDS = list(range(10, 31))  # 21 tokens


def test_stream_bos_is_prepended_once_and_remainder_dropped():
    windows = windows_of(IDS, PPLProtocol(seq_len=5, bos="stream"), bos_id=1)
    assert windows.tolist() == [
        [1, 10, 11, 12, 13],
        [14, 15, 16, 17, 18],
        [19, 20, 21, 22, 23],
        [24, 25, 26, 27, 28],
    ]


def test_window_bos_starts_every_window():
    windows = windows_of(IDS, PPLProtocol(seq_len=5, bos="window"), bos_id=1)
    assert windows.shape == (5, 5)
    assert windows[:, 0].tolist() == [1] * 5
    assert windows[:, 1:].flatten().tolist() == IDS[:20]


def test_no_bos():
    windows = windows_of(IDS, PPLProtocol(seq_len=4, bos="none"), bos_id=None)
    assert windows.flatten().tolist() == IDS[:20]


def test_bad_protocols():
    with pytest.raises(ConfigError):
        PPLProtocol(bos="sometimes")
    with pytest.raises(ConfigError):
        PPLProtocol(seq_len=1)
    with pytest.raises(ConfigError):
        PPLProtocol(max_windows=0)
    with pytest.raises(DataError, match="fewer than one"):
        windows_of(IDS, PPLProtocol(seq_len=64), bos_id=1)


def test_uniform_model_has_perplexity_equal_to_vocab_size(tokenizer, data_dir):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0 → uniform prediction
    result = perplexity(
        model, tokenizer, PPLProtocol("wikitext2", seq_len=16), data_dir, progress=False
    )
    assert result.ppl == pytest.approx(VOCAB, rel=1e-5)
    assert result.windows == result.total_windows and result.tokens == result.windows * 15


def test_perplexity_matches_a_direct_computation_and_records_protocol(tokenizer, data_dir):
    model = tiny_model("llama")
    protocol = PPLProtocol("ptb", seq_len=16, max_windows=5, batch_size=2)
    result = perplexity(model, tokenizer, protocol, data_dir, progress=False)
    text = load_eval_text("ptb", data_root=data_dir).text
    ids = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    windows = torch.tensor(ids[: 5 * 16]).view(5, 16)
    with torch.no_grad():
        losses = [float(model(w[None], labels=w[None]).loss) for w in windows]
    assert result.ppl == pytest.approx(math.exp(sum(losses) / 5), rel=1e-5)
    assert result.windows == 5 and result.total_windows > 5
    assert result.protocol["max_windows"] == 5 and result.protocol["split"] == "validation"
    assert result.protocol["bos"] == "stream" and result.protocol["source"].startswith("local:")


def test_wikitext_rows_follow_the_hf_convention(data_dir):
    text = load_eval_text("wikitext2", data_root=data_dir).text
    # whitespace-only lines become "" and rows are joined with blank lines
    assert text.startswith("\n\n = w5 w6 = \n\n\n")


def test_missing_files_and_directories(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_eval_text("wikitext2", data_root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="ptb.valid.txt is missing"):
        load_eval_text("ptb", data_root=tmp_path)
    with pytest.raises(DataError, match="Only the WikiText-2 test split"):
        load_eval_text("wikitext2", "train", data_root=tmp_path)


def test_without_data_dir_the_hub_is_tried_and_failure_is_explained(monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setattr("datasets.load_dataset", offline)
    with pytest.raises(DataError, match="--data-dir"):
        load_eval_text("wikitext2")
