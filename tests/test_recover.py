"""Recovery after pruning on tiny random models: every method trains, merges, saves, resumes.

A character-level tokenizer (built in memory) and a small repeated text keep each run to a
few dozen optimizer steps on CPU.
"""

from __future__ import annotations

import json
import logging
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from secateurs.checkpoint import read_record
from secateurs.errors import ConfigError, DataError, OutputExistsError
from secateurs.recover import (
    DistillSettings,
    LoraSettings,
    TrainConfig,
    attach_lora,
    distillation_kl,
    merge_lora,
    pack_documents,
    recover,
    train_cpt,
    train_lora,
)
from secateurs.recover import common as recover_common
from secateurs.run import prune
from secateurs.writer import save_checkpoint
from tiny_models import tiny_model

# Tiny models gain nothing from threads, and on a busy shared CPU they lose a lot.
torch.set_num_threads(1)

TEXT = "the quick brown fox jumps over the lazy dog. " * 8


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character; ids 0-3 are special; fits the tiny vocab of 128."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.printable[:95]:
        vocab.setdefault(char, len(vocab))
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def quick(tokens: int = 4096, lr: float = 2e-2, **kw) -> TrainConfig:
    """Tiny-model settings: 16 steps of 4 x 64 tokens, high lr, a loss point every step."""
    settings = dict(seq_len=64, batch_size=4, lr=lr, warmup=0, log_steps=1, save_steps=1000)
    return TrainConfig(tokens=tokens, **{**settings, **kw})


def sharp_tiny_llama():
    """The tiny LLaMA with 10x embeddings: at init scale (std 0.02, width 32) tied logits stay
    within about +-0.6, so a model with frozen embeddings (LoRA) could not fit any text."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n\n".join([TEXT] * 6))
    return path


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("models") / "dense"
    save_checkpoint(sharp_tiny_llama(), tokenizer, out, {})
    return out


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, tokenizer, dense_dir) -> Path:
    """The tiny LLaMA with 2 of 6 blocks removed, saved as `secateurs prune` would."""
    out = tmp_path_factory.mktemp("models") / "pruned"
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    prune(
        model,
        tokenizer=tokenizer,
        criterion="magnitude",
        protect="none",
        remove=2,
        out=out,
        progress=False,
    )
    return out


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tokenizer, dense_dir) -> Path:
    """The dense model after learning the text: a teacher the pruned student is far from."""
    out = tmp_path_factory.mktemp("models") / "teacher"
    blocks = pack_documents(tokenizer, [TEXT] * 6, 64)
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    trained, _ = train_cpt(model, blocks, quick(), out.with_name("teacher.work"), progress=False)
    save_checkpoint(trained, tokenizer, out, {})
    return out


def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


IDS = torch.randint(4, 99, (2, 24), generator=torch.Generator().manual_seed(0))


# --- every method ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "cpt", "cpt+lora", "distill"])
def test_method_lowers_loss_and_saves_a_plain_checkpoint(
    method, pruned_dir, text_file, teacher_dir, tmp_path
):
    out = tmp_path / "recovered"
    lora_train = quick(2048) if method == "cpt+lora" else None
    result = recover(
        pruned_dir,
        out,
        method=method,
        data=str(text_file),
        train=quick(),
        lora_train=lora_train,
        lora=LoraSettings(r=8, dropout=0.0),
        distill=DistillSettings(temperature=1.0),
        teacher=str(teacher_dir),
        progress=False,
    )
    rec = result.record["recovery"]
    for stage in result.stages:
        losses = [p["loss"] for p in stage.loss_curve]
        assert losses[-1] < 0.8 * losses[0], (stage.method, losses)
    expected_tokens = 4096 + (2048 if method == "cpt+lora" else 0)
    assert rec["tokens_seen"] == expected_tokens
    assert [s["method"] for s in rec["stages"]] == method.split("+")
    saved = read_record(out)
    assert saved["plan"] == read_record(pruned_dir)["plan"]  # the pruning record is kept
    assert saved["recovery"]["loss_curve"] == rec["loss_curve"]
    assert json.loads((out / "loss_curve.json").read_text()) == rec["loss_curve"]
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert not (tmp_path / "recovered.work").exists()  # work dir removed after success
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.num_hidden_layers == 4
    assert not any("lora" in name for name, _ in plain.named_parameters())
    torch.testing.assert_close(logits_of(plain, IDS), logits_of(result.model, IDS))


def test_distill_teacher_defaults_to_the_source_model(pruned_dir, text_file, tmp_path):
    result = recover(
        pruned_dir,
        None,
        method="distill",
        data=str(text_file),
        train=quick(1024),
        work_dir=tmp_path / "w",
        progress=False,
    )
    assert result.record["recovery"]["teacher"] == read_record(pruned_dir)["source_model"]


def test_distillation_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    assert distillation_kl(logits, logits, 2.0).abs() < 1e-6
    assert distillation_kl(logits, logits.flip(-1), 2.0) > 0.1


# --- LoRA merge --------------------------------------------------------------------------------


def test_lora_merge_gives_the_adapter_models_logits(tokenizer, tmp_path):
    base = sharp_tiny_llama()
    before = logits_of(base, IDS)
    blocks = pack_documents(tokenizer, [TEXT] * 6, 64)
    adapted, _ = train_lora(
        base, blocks, quick(1024), tmp_path, LoraSettings(dropout=0.0), progress=False, merge=False
    )
    with_adapter = logits_of(adapted, IDS)
    assert (with_adapter - before).abs().max() > 1e-3  # the adapter learned something
    merged = merge_lora(adapted)
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits_of(merged, IDS), with_adapter, atol=1e-5, rtol=1e-5)


def test_lora_with_bad_target_modules_is_a_config_error():
    with pytest.raises(ConfigError, match="LoRA"):
        attach_lora(tiny_model("llama"), LoraSettings(target_modules=("no_such_proj",)))


# --- resume ------------------------------------------------------------------------------------


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_interrupted_cpt_resumes_from_its_checkpoint(tokenizer, tmp_path):
    blocks = pack_documents(tokenizer, [TEXT] * 6, 64)
    full = quick(2048, save_steps=3)  # 8 steps
    straight, _ = train_cpt(tiny_model("llama"), blocks, full, tmp_path / "a", progress=False)

    work = tmp_path / "b"
    stopped = TrainConfig(**{**full.__dict__, "max_steps": 3})
    _, first = train_cpt(tiny_model("llama"), blocks, stopped, work, progress=False)
    assert first.global_step == 3 and (work / "checkpoint-3").is_dir()
    with pytest.raises(OutputExistsError, match="--resume"):
        train_cpt(tiny_model("llama"), blocks, full, work, progress=False)
    resumed, second = train_cpt(
        tiny_model("llama"), blocks, full, work, resume=True, progress=False
    )
    assert second.resumed_from.endswith("checkpoint-3")
    assert second.global_step == 8 and second.tokens_seen == 2048
    assert [p["step"] for p in second.loss_curve] == list(range(1, 9))  # curve kept across resume
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[name], value, atol=1e-5, rtol=1e-5)


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: bad input must be caught before."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(recover_common.Trainer, "train", refuse)


def test_missing_data_file_is_a_data_error(pruned_dir, tmp_path, no_training):
    with pytest.raises(DataError, match="does not exist"):
        recover(pruned_dir, tmp_path / "o", data=str(tmp_path / "nope.txt"), train=quick())


def test_empty_data_file_is_a_data_error(pruned_dir, tmp_path, no_training):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no text"):
        recover(pruned_dir, tmp_path / "o", data=str(empty), train=quick())


def test_budget_below_one_batch_is_a_config_error():
    with pytest.raises(ConfigError, match="smaller than one optimizer step"):
        TrainConfig(tokens=100, seq_len=64, batch_size=4)


def test_existing_output_needs_overwrite(pruned_dir, text_file, tmp_path, no_training):
    out = tmp_path / "o"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        recover(pruned_dir, out, data=str(text_file), train=quick())


def test_unpruned_model_warns(dense_dir, text_file, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="secateurs.recover"):
        recover(dense_dir, tmp_path / "o", data=str(text_file), train=quick(1024), progress=False)
    assert "no secateurs pruning record" in caplog.text


def test_distill_without_teacher_or_source_is_a_config_error(
    dense_dir, text_file, tmp_path, no_training
):
    with pytest.raises(ConfigError, match="--teacher"):
        recover(dense_dir, tmp_path / "o", method="distill", data=str(text_file), train=quick())


def test_cpt_lora_needs_a_lora_budget(pruned_dir, text_file, tmp_path, no_training):
    with pytest.raises(ConfigError, match="LoRA budget"):
        recover(pruned_dir, tmp_path / "o", method="cpt+lora", data=str(text_file), train=quick())


def test_packing_joins_documents_with_eos(tokenizer):
    blocks = pack_documents(tokenizer, ["ab", "cd"], seq_len=3)
    eos = tokenizer.eos_token_id
    ab, cd = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("ab", "cd"))
    assert blocks.tolist() == [[*ab, eos], [*cd, eos]]
    assert pack_documents(tokenizer, ["ab", "cd"], seq_len=4).tolist() == [[*ab, eos, *cd[:1]]]
    with pytest.raises(DataError, match="fewer than one"):
        pack_documents(tokenizer, ["a"], seq_len=64)


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_recover_and_its_errors(pruned_dir, text_file, tmp_path, capsys):
    from secateurs.cli import main as cli_main

    out = tmp_path / "cli"
    args = [
        "recover",
        str(pruned_dir),
        "--method",
        "lora",
        "--data",
        str(text_file),
        "--tokens",
        "1024",
        "--seq-len",
        "64",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    assert "tokens seen: 1,024" in capsys.readouterr().out
    assert read_record(out)["recovery"]["hyperparameters"]["lora"]["lora"]["r"] == 8
    assert cli_main(args) == 2  # output exists
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main([*args[:-1], str(tmp_path / "x"), "--method", "cpt+lora"]) == 2
    assert "--lora-tokens" in capsys.readouterr().err


def test_removed_branches_survive_recovery_and_reload_through_secateurs(
    tokenizer, dense_dir, text_file, tmp_path
):
    """Attention branches removed: not expressible in an HF config, reloaded from the record."""
    from secateurs.models import load_model

    pruned = tmp_path / "attn-pruned"
    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    prune(
        model,
        tokenizer=tokenizer,
        criterion="magnitude",
        unit="attn",
        protect="none",
        remove=2,
        out=pruned,
        progress=False,
    )
    out = tmp_path / "recovered"
    result = recover(
        pruned, out, method="distill", data=str(text_file), train=quick(1024), progress=False
    )
    saved = read_record(out)
    assert saved["loading"]["plain_transformers"] is False
    assert saved["structure"] == read_record(pruned)["structure"]
    reloaded, _ = load_model(out)
    torch.testing.assert_close(logits_of(reloaded, IDS), logits_of(result.model, IDS))


def test_gradient_checkpointing_trains_and_is_switched_off_after(tokenizer, tmp_path):
    blocks = pack_documents(tokenizer, [TEXT] * 6, 64)
    config = quick(1024, gradient_checkpointing=True)
    model, result = train_lora(sharp_tiny_llama(), blocks, config, tmp_path, progress=False)
    assert result.global_step == 4
    assert result.loss_curve[-1]["loss"] < result.loss_curve[0]["loss"]
    assert not model.is_activation_checkpointing and model.config.use_cache


def test_stale_work_dir_needs_resume(pruned_dir, text_file, tmp_path, no_training):
    (tmp_path / "o.work" / "lora" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="--resume"):
        recover(pruned_dir, tmp_path / "o", data=str(text_file), train=quick())


def test_stopped_cpt_lora_saves_nothing_then_resumes_into_lora(pruned_dir, text_file, tmp_path):
    out = tmp_path / "o"
    common = dict(method="cpt+lora", data=str(text_file), train=quick(2048), progress=False)
    stopped = recover(pruned_dir, out, lora_train=quick(1024, max_steps=2), **common)
    assert not stopped.finished and stopped.out is None and not out.exists()
    assert (tmp_path / "o.work" / "cpt-model" / "secateurs.json").is_file()
    done = recover(pruned_dir, out, lora_train=quick(1024), resume=True, **common)
    assert done.finished and out.is_dir()
    cpt, lora = done.stages
    assert cpt.to_dict() == stopped.stages[0].to_dict()  # the finished CPT stage was reused
    assert lora.resumed_from.endswith("checkpoint-2") and lora.global_step == 4
    assert read_record(out)["recovery"]["tokens_seen"] == 2048 + 1024
