"""Zero-shot: local loaders parse every file (counts from the data README), prompts match
lm-eval's, and an lm-eval run on a tiny model returns the papers' metrics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from secateurs.errors import ConfigError
from secateurs.evaluate.zeroshot import (
    PAPER_TASKS,
    TASKS,
    format_table,
    local_task,
    parse_tasks,
    zeroshot,
)
from tiny_models import TINY_CONFIGS

README_COUNTS = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
}


def _shared_data() -> Path | None:
    for candidate in (os.environ.get("SECATEURS_DATA_DIR"), "/work/shared/data"):
        if candidate and (Path(candidate) / "boolq" / "dev.jsonl").is_file():
            return Path(candidate)
    return None


SHARED = _shared_data()
needs_data = pytest.mark.skipif(SHARED is None, reason="needs the shared data directory")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A download-free word-level tokenizer (ids < 128, the tiny models' vocabulary)."""
    words = ["the", "a", "an", "of", "to", "and", "in", "is", "was", "for", "on", "that", "it"]
    symbols = list("abcdefghijklmnopqrstuvwxyz.,?!:;'\"-()")
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words, *symbols])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def long_context_llama() -> AutoModelForCausalLM:
    values = dict(TINY_CONFIGS["llama"], max_position_embeddings=512)
    config = AutoConfig.for_model("llama", **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_paper_tasks_and_metrics_are_registered():
    metrics = {name: TASKS.get(name).metric for name in PAPER_TASKS}
    assert metrics == {
        "boolq": "acc",
        "piqa": "acc",
        "hellaswag": "acc_norm",
        "winogrande": "acc",
        "arc_easy": "acc",
        "arc_challenge": "acc_norm",
        "openbookqa": "acc_norm",
    }
    assert {n: TASKS.get(n).count for n in PAPER_TASKS} == README_COUNTS


def test_parse_tasks_suggests_names():
    assert parse_tasks("piqa, boolq,piqa") == ("piqa", "boolq")
    assert parse_tasks(None) == PAPER_TASKS
    with pytest.raises(ConfigError, match="Did you mean 'hellaswag'"):
        parse_tasks("helaswag")


@needs_data
@pytest.mark.parametrize("name", PAPER_TASKS)
def test_local_loader_parses_every_row(name):
    docs = TASKS.get(name).load(SHARED)
    assert len(docs) == README_COUNTS[name]
    for doc in docs:
        if name in ("arc_easy", "arc_challenge", "openbookqa"):
            assert doc["answerKey"] in doc["choices"]["label"]
            assert 3 <= len(doc["choices"]["text"]) <= 5
        elif name == "hellaswag":
            assert len(doc["choices"]) == 4 and 0 <= doc["label"] <= 3 and doc["query"]
        elif name == "winogrande":
            assert doc["sentence"].count("_") == 1 and doc["answer"] in ("1", "2")
        else:
            assert doc["label"] in (0, 1)


@needs_data
def test_prompts_follow_lm_eval():
    boolq = local_task("boolq", SHARED)
    doc = boolq.test_docs()[0]
    assert boolq.doc_to_text(doc) == f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
    assert boolq.doc_to_choice(doc) == ["no", "yes"] and doc["label"] == 0  # first answer: false
    arc = local_task("arc_easy", SHARED)
    doc = arc.test_docs()[0]
    assert arc.doc_to_text(doc) == f"Question: {doc['question']}\nAnswer:"
    assert arc.doc_to_choice(doc)[arc.doc_to_target(doc)].startswith("Sunlight")
    wino = local_task("winogrande", SHARED)
    doc = wino.test_docs()[0]  # "Sarah was a much better surgeon than Maria so _ always ..."
    assert wino.doc_to_text(doc) == 1
    assert wino.doc_to_choice(doc)[1].endswith("than Maria so Maria")
    assert wino.doc_to_target(doc) == "always got the easier cases."


def _run(tasks: str, limit: int):
    return zeroshot(
        long_context_llama(), word_tokenizer(), tasks, limit=limit, batch_size=4, data_root=SHARED
    )


@needs_data
def test_lm_eval_run_on_tiny_model():
    result = _run("boolq,winogrande", limit=2)
    assert set(result.scores) == {"boolq", "winogrande"}
    assert all(0.0 <= v <= 1.0 for v in result.scores.values())
    assert result.samples == {"boolq": 2, "winogrande": 2}
    assert result.mean == pytest.approx(sum(result.scores.values()) / 2)
    assert result.protocol["limit"] == 2 and result.protocol["source"].startswith("local:")


@needs_data
@pytest.mark.slow
def test_lm_eval_all_seven_tasks():
    result = _run(",".join(PAPER_TASKS), limit=3)
    assert list(result.scores) == list(PAPER_TASKS)
    assert result.metrics["hellaswag"].keys() >= {"acc", "acc_norm"}
    assert result.scores["hellaswag"] == result.metrics["hellaswag"]["acc_norm"]


# --- LAMBADA (lambada_openai) ---------------------------------------------------------------

LAMBADA_TEXTS = [
    "the cat sat on the mat and it was a cat",
    "a dog ran to the park. the dog was happy",
    "it is in the box , and the box is on the table",
    "an apple a day keeps the doctor away from the apple",
    "she said that it was for the best",
]


@pytest.fixture
def lambada_dir(tmp_path):
    folder = tmp_path / "lambada"
    folder.mkdir()
    rows = "".join(json.dumps({"text": text}) + "\n" for text in LAMBADA_TEXTS)
    (folder / "lambada_test.jsonl").write_text(rows)
    return tmp_path


def _target_loglikelihood(model, tokenizer, text: str) -> tuple[float, bool]:
    """lm-eval's loglikelihood request, computed directly: the context is the text up to its
    last space, the target " " + the last word; (sum of target log-probs, all greedy)."""
    context, word = text.rsplit(" ", 1)
    whole = tokenizer(context + " " + word)["input_ids"]
    target = whole[len(tokenizer(context)["input_ids"]) :]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0, -len(target) :].log_softmax(-1)
    chosen = logits[torch.arange(len(target)), torch.tensor(target)]
    return float(chosen.sum()), bool((logits.argmax(-1) == torch.tensor(target)).all())


def test_lambada_reports_accuracy_and_target_perplexity_as_computed_directly(lambada_dir):
    model, tokenizer = long_context_llama(), word_tokenizer()
    result = zeroshot(model, tokenizer, "lambada", batch_size=2, data_root=lambada_dir)
    assert list(result.scores) == ["lambada_openai"]  # the alias resolves
    assert result.samples == {"lambada_openai": len(LAMBADA_TEXTS)}
    direct = [_target_loglikelihood(model, tokenizer, text) for text in LAMBADA_TEXTS]
    expected_ppl = math.exp(-sum(ll for ll, _ in direct) / len(direct))
    expected_acc = sum(greedy for _, greedy in direct) / len(direct)
    metrics = result.metrics["lambada_openai"]
    assert metrics["perplexity"] == pytest.approx(expected_ppl, rel=1e-4)
    assert result.scores["lambada_openai"] == metrics["acc"] == pytest.approx(expected_acc)
    table = format_table(result)
    assert f"| lambada_openai | perplexity | {expected_ppl:.4f} | 5 |" in table


def test_lambada_is_registered_beside_the_paper_tasks():
    task = TASKS.get("lambada")
    assert (task.name, task.metric, task.count, task.hub_task) == (
        "lambada_openai",
        "acc",
        5153,
        "lambada_openai",
    )
    assert "lambada_openai" not in PAPER_TASKS  # asked for by name, not in the papers' mean


@needs_data
def test_lambada_local_file_has_every_passage_and_the_stock_prompt():
    task = local_task("lambada_openai", SHARED)
    docs = task.test_docs()
    assert len(docs) == 5153
    text = docs[0]["text"]
    assert task.doc_to_text(docs[0]) + task.doc_to_target(docs[0]) == text
    assert task.doc_to_target(docs[0]) == " signs"
