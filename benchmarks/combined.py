"""Depth + width under one parameter budget on SmolLM2-135M (``prune --unit block,width``).

One budget (``--ratio`` of the non-embedding parameters) split by ``--depth-share`` between
whole blocks (``block-influence+``: Shortened LLaMA's protected blocks) and width
(``fluctuation``, global allocation, reconstruction and sensitivity at their defaults). Share 0
is width pruning alone and share 1 block pruning alone (``--remove`` the blocks worth the
budget), through the same ``prune`` entry. No retraining; WikiText-2 / PTB perplexity, 128-token
windows, no BOS (SmolLM2's tokenizer adds none), the first ``--max-windows`` windows.

    python benchmarks/combined.py --ratio 0.2 --shares 0,0.25,0.5,0.75,1 --max-windows 64
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import markdown_table, prune_batched, write_results  # noqa: E402

from secateurs.adapters import adapter_for  # noqa: E402
from secateurs.choose import decoder_parameters  # noqa: E402
from secateurs.data import CalibrationConfig  # noqa: E402
from secateurs.evaluate.ppl import PPLProtocol, perplexity  # noqa: E402
from secateurs.models import load_model  # noqa: E402
from secateurs.runinfo import count_parameters  # noqa: E402
from secateurs.session import ResidentSession  # noqa: E402

COLUMNS = [
    ("depth_share", "depth share"),
    ("blocks", "blocks removed"),
    ("achieved_ratio", "removed (non-emb.)"),
    ("params_m", "params (M)"),
    ("wikitext2", "WikiText-2 PPL"),
    ("ptb", "PTB PPL"),
    ("prune_s", "prune s"),
]


def _ppl(model, tokenizer, windows: int) -> dict[str, float]:
    protocol = lambda name: PPLProtocol(name, bos="none", max_windows=windows)  # noqa: E731
    return {
        n: perplexity(model, tokenizer, protocol(n), progress=False).ppl
        for n in ("wikitext2", "ptb")
    }


def parameter_base(model) -> int:
    """The parameters ``--ratio`` is a fraction of: all but the embeddings and the head."""
    return decoder_parameters(ResidentSession(model), include_embeddings=False)


def _prune(model, tokenizer, ratio: float, share: float):
    """Scoring one window per forward, reconstruction 8 (the protocol of the published table);
    calibration: the defaults (10 C4 windows × 128 tokens, seed 0; reconstruction 64)."""
    if share == 0:
        return prune_batched(model, tokenizer, criterion="fluctuation", unit="width",
                             ratio=ratio, allocation="global")  # fmt: skip
    if share == 1:
        adapter = adapter_for(model)
        block = count_parameters(adapter.layers(model)[0])
        blocks = round(ratio * parameter_base(model) / block)
        return prune_batched(model, tokenizer, criterion="block-influence+", unit="block",
                             remove=blocks)  # fmt: skip
    return prune_batched(model, tokenizer, criterion="block-influence+,fluctuation",
                         unit="block,width", ratio=ratio, depth_share=share,
                         allocation="global")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--shares", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--max-windows", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    dense, tokenizer = load_model(args.model)
    base = parameter_base(dense)
    ppl = _ppl(dense, tokenizer, args.max_windows)
    params = count_parameters(dense) / 1e6
    rows.append(dict(depth_share="dense", blocks=0, achieved_ratio=0.0, params_m=params, **ppl))
    print(rows[-1], flush=True)
    del dense
    for share in (float(s) for s in args.shares.split(",")):
        model, tokenizer = load_model(args.model)
        before = count_parameters(model)
        start = time.perf_counter()
        result = _prune(model, tokenizer, args.ratio, share)
        seconds = time.perf_counter() - start
        after = count_parameters(model)
        row = dict(
            depth_share=share,
            blocks=len(result.plan.blocks),
            achieved_ratio=round((before - after) / base, 4),
            params_m=after / 1e6,
            prune_s=round(seconds, 1),
            **_ppl(model, tokenizer, args.max_windows),
        )
        rows.append(row)
        print(row, flush=True)
        del model, result
    table = markdown_table(rows, COLUMNS)
    protocol = dict(
        model=args.model,
        ratio=args.ratio,
        ratio_of="non-embedding parameters",
        block_criterion="block-influence+",
        width_criterion="fluctuation (global, reconstruction, sensitivity: defaults)",
        calibration=vars(CalibrationConfig()),
        ppl=dict(seq_len=128, bos="none", max_windows=args.max_windows),
        threads=1,
    )
    write_results("combined", dict(protocol=protocol, rows=rows), table)


if __name__ == "__main__":
    main()
