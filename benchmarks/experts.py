"""Expert pruning on a random-weight Mixtral-shaped model: exactness, size and speed.

No MoE checkpoint is available offline, so this measures what a random model can show honestly:
that pruning equals router masking at a realistic width (max |Δlogit|), how parameters and
weight memory shrink, and that generation speed barely moves (every token still runs top-k
experts). It says nothing about quality. Protocol: hidden 512, 8 experts of width 1024, top-2,
4 layers, vocab 4096, float32, CPU, one thread; `magnitude` scores, uniform removal of 0/2/4
experts per layer; logits on 2×64 random tokens; greedy generation of 32 tokens after an
8-token prompt at batch 1, median of 5 after 1 warm-up, all models measured in one process.

    python benchmarks/experts.py
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_results  # noqa: E402

from secateurs.evaluate.efficiency import linear_macs_per_token, weight_bytes  # noqa: E402
from secateurs.run import prune  # noqa: E402
from secateurs.units import masked  # noqa: E402

CONFIG = dict(
    vocab_size=4096,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_local_experts=8,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    pad_token_id=0,
)
REMOVALS = (0, 2, 4)


def latency(model, prompt: torch.Tensor, repeats: int = 5) -> float:
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    model.generate(prompt, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = AutoConfig.for_model("mixtral", **CONFIG)
    dense = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(
        1, CONFIG["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1)
    )
    prompt = ids[:1, :8]
    rows = []
    for remove in REMOVALS:
        model = copy.deepcopy(dense)
        error = 0.0
        if remove:
            # --remove counts experts per MoE layer (uniform allocation)
            result = prune(model, unit="experts", criterion="magnitude", remove=remove,
                           progress=False)  # fmt: skip
            with torch.no_grad(), masked(dense, result.plan):
                reference = dense(input_ids=ids).logits
            with torch.no_grad():
                error = float((model(input_ids=ids).logits - reference).abs().max())
        rows.append(
            {
                "experts": f"{8 - remove} of 8",
                "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                "weight_mb": weight_bytes(model) / 2**20,
                "macs_m": linear_macs_per_token(model) / 1e6,
                "max_err": f"{error:.1e}",
                "latency_s": latency(model, prompt),
            }
        )
        del model
    base = rows[0]["latency_s"]
    for row in rows:
        row["speedup"] = base / row["latency_s"]
    columns = [
        ("experts", "experts per layer"),
        ("params_m", "params (M)"),
        ("weight_mb", "weights (MB)"),
        ("macs_m", "MMACs/token"),
        ("max_err", "max abs Δlogit vs masked"),
        ("latency_s", "latency 32 tok (s)"),
        ("speedup", "speedup"),
    ]
    table = markdown_table(rows, columns)
    write_results(
        "experts", {"protocol": __doc__.split("\n\n")[1], "config": CONFIG, "rows": rows}, table
    )


if __name__ == "__main__":
    main()
