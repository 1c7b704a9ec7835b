"""Models larger than memory: depth-prune a Llama-3.2-3B-shaped checkpoint without loading it.

Protocol: write a checkpoint with Llama-3.2-3B's config (28 layers, hidden 3072, GQA 24q/8kv,
MLP 8192, vocab 128,256, tied embeddings) and random bf16 weights, sharded at 5 GB as released
(speed and memory do not depend on the values); then, each step in a fresh process, stream it
through depth surgery (8 blocks removed, an explicit plan) and record that process's peak RSS,
wall time and the output's size. Last, a separate process loads the output with plain
``AutoModelForCausalLM.from_pretrained`` and runs a forward pass (not part of the memory budget:
that is the user's own load).

    OMP_NUM_THREADS=1 python benchmarks/scale.py --work /tmp/scale

Scoring a model of this size layer by layer (block-influence, ppl) is not implemented yet; the
plan here is given explicitly (``--blocks``), as a user reproducing a selection would.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import markdown_table, run_measured, write_results

LLAMA_3_2_3B = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=128256,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=128000,
    eos_token_id=128001,
    dtype="bfloat16",
)
# Shortened LLaMA-style middle-to-late blocks; the point here is memory, not which blocks.
DEFAULT_BLOCKS = "14,15,16,17,18,19,20,21"


def write_random_checkpoint(directory: Path, shard: str = "5GB") -> None:
    """A Llama-3.2-3B-shaped checkpoint, written tensor by tensor (never the whole model)."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import LlamaConfig

    from secateurs.streaming import TensorSpec, meta_skeleton, saved_state, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**{k: v for k, v in LLAMA_3_2_3B.items() if k != "model_type"}).save_pretrained(
        directory
    )
    state = saved_state(meta_skeleton(directory))
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard)
    generator = torch.Generator().manual_seed(0)

    def random(name: str) -> torch.Tensor:
        tensor = torch.empty(state[name].shape, dtype=state[name].dtype)
        return (
            tensor.fill_(1.0)
            if name.endswith("norm.weight")
            else tensor.normal_(0, 0.02, generator=generator)
        )

    for filename, names in split.filename_to_tensors.items():
        specs = [TensorSpec(n, state[n].dtype, tuple(state[n].shape)) for n in names]
        write_safetensors(directory / filename, specs, random, {"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    logits = model(torch.tensor([[128000, 791, 6864, 315, 9822, 374]])).logits
assert torch.isfinite(logits.float()).all()
print(model.config.num_hidden_layers, sum(p.numel() for p in model.parameters()))
"""


def size_gb(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors")) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-scale"))
    parser.add_argument("--blocks", default=DEFAULT_BLOCKS)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()
    source, out = args.work / "llama-3.2-3b-random", args.work / "pruned"
    if not (source / "model.safetensors.index.json").is_file():
        seconds, peak = run_measured([sys.executable, __file__, "--write-only", str(source)])
        print(f"wrote {size_gb(source):.2f} GB in {seconds:.0f} s (peak RSS {peak:,.0f} MB)")
    # the user's command: secateurs prune SOURCE --blocks ... --stream
    stream = ["prune", str(source), "--blocks", args.blocks, "--stream", "--out", str(out)]
    seconds, peak = run_measured([sys.executable, "-m", "secateurs.cli", *stream, "--overwrite"])
    load_s, load_peak = run_measured([sys.executable, "-c", LOAD, str(out)])
    rows = [
        dict(
            step="depth: stream surgery, 8 of 28 blocks",
            blocks=args.blocks,
            input_gb=round(size_gb(source), 2),
            output_gb=round(size_gb(out), 2),
            wall_s=round(seconds, 1),
            peak_rss_mb=round(peak),
            rss_vs_model=round(peak / (size_gb(source) * 1000), 3),
            plain_load=True,
            plain_load_peak_mb=round(load_peak),
        )
    ]
    columns = [
        ("step", "step"),
        ("blocks", "removed blocks"),
        ("input_gb", "input GB"),
        ("output_gb", "output GB"),
        ("wall_s", "wall s"),
        ("peak_rss_mb", "peak RSS MB"),
        ("rss_vs_model", "RSS / model size"),
        ("plain_load", "plain from_pretrained + forward"),
        ("plain_load_peak_mb", "that load's peak RSS MB"),
    ]
    write_results("scale", {"model": LLAMA_3_2_3B, "rows": rows}, markdown_table(rows, columns))
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--write-only":
        write_random_checkpoint(Path(sys.argv[2]))
    else:
        main()
