"""MoE checkpoints stored expert by expert, pruned layer by layer: peak memory vs the model.

Protocol: write a checkpoint with OLMoE-1B-7B's layer shapes (hidden 2048, 16 heads, 64 routed
experts of width 1024, top-8, vocabulary 50,304) but 4, then 8 of its 16 layers (the peak should
not grow with the layer count), random bf16 weights,
in the hub's layout (each expert's gate/up/down projections a tensor of its own, 2 GB shards),
with SmolLM2's tokenizer (its ids are valid in the larger vocabulary) so that calibration comes
from the usual C4 sample. transformers 5 stacks each layer's 3 × 64 expert tensors into two
fused tensors on load; the layer-by-layer path runs that same conversion one layer at a time.
Each step is a fresh ``secateurs prune --sequential ...`` process (bf16 compute), recording its
peak RSS and wall time; one layer's tensors and the whole checkpoint are given for scale. Steps:
depth (block-influence, ppl; 1 block) and expert removal (REAP, 16 of the 64 experts of every
layer, cut and written layer by layer, the rest renumbered one by one).

    OMP_NUM_THREADS=1 python benchmarks/moe_lazy.py --work /tmp/moe-lazy
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import markdown_table, run_measured, write_results

OLMOE_SHAPED = dict(
    architectures=["OlmoeForCausalLM"],
    hidden_size=2048,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    num_experts=64,
    num_experts_per_tok=8,
    vocab_size=50304,
    max_position_embeddings=4096,
    pad_token_id=1,
    bos_token_id=None,
    eos_token_id=50279,
    tie_word_embeddings=False,
    dtype="bfloat16",
)

STEPS = {
    "depth: block-influence, 1 block": ["--unit", "block", "--criterion", "block-influence",
                                        "--remove", "1", "--protect", "none"],
    "depth: ppl, 1 block": ["--unit", "block", "--criterion", "ppl", "--remove", "1",
                            "--protect", "none"],
    "experts: reap, 16 of 64 per layer": ["--unit", "experts", "--criterion", "reap",
                                          "--remove", "16"],
}  # fmt: skip


def write_random_checkpoint(directory: Path, layers: int, shard: str = "2GB") -> None:
    """The checkpoint in the hub's per-expert layout, written tensor by tensor."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers import OlmoeConfig

    from secateurs.shards import TensorSpec, meta_skeleton, saved_state, write_safetensors

    directory.mkdir(parents=True, exist_ok=True)
    OlmoeConfig(**{**OLMOE_SHAPED, "num_hidden_layers": layers}).save_pretrained(directory)
    # save_pretrained's names (experts one by one); fresh meta tensors, since the reverse
    # conversion's are views of one stacked storage, which the shard splitter would count whole
    state = {
        name: torch.empty(t.shape, dtype=t.dtype, device="meta")
        for name, t in saved_state(meta_skeleton(directory)).items()
    }
    assert any(".experts.63.down_proj.weight" in name for name in state)
    split = split_torch_state_dict_into_shards(state, max_shard_size=shard)
    generator = torch.Generator().manual_seed(0)

    def random(name: str) -> torch.Tensor:
        tensor = torch.empty(state[name].shape, dtype=state[name].dtype)
        if name.endswith("norm.weight"):
            return tensor.fill_(1.0)
        return tensor.normal_(0, 0.02, generator=generator)

    for filename, names in split.filename_to_tensors.items():
        specs = [TensorSpec(n, state[n].dtype, tuple(state[n].shape)) for n in names]
        write_safetensors(directory / filename, specs, random, {"format": "pt"})
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    from secateurs.models import load_model

    load_model("smollm2-135m")[1].save_pretrained(directory)


def sizes(directory: Path) -> tuple[float, float, int]:
    """GB of the checkpoint, GB of layer 1's tensors, and how many tensors layer 1 has."""
    from secateurs.shards import CheckpointReader

    reader = CheckpointReader(directory)
    layer = [n for n in reader.names() if n.startswith("model.layers.1.")]
    layer_bytes = sum(reader.meta(n).numel() * 2 for n in layer)
    total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    return total / 1e9, layer_bytes / 1e9, len(layer)


def run_step(name: str, flags: list[str], source: Path, out: Path, calib: list[str]) -> dict:
    command = ["prune", str(source), "--sequential", *flags, "--out", str(out)]
    command += ["--overwrite", "--dtype", "bfloat16", *calib]
    seconds, peak = run_measured([sys.executable, "-m", "secateurs.cli", *command])
    record = json.loads((out / "secateurs.json").read_text())
    total, layer, _ = sizes(source)
    return dict(
        step=name,
        layers=json.loads((source / "config.json").read_text())["num_hidden_layers"],
        removed=_removed(record),
        output_gb=round(sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9, 2),
        input_gb=round(total, 2),
        layer_gb=round(layer, 3),
        wall_s=round(seconds, 1),
        scoring_s=record.get("timings", {}).get("scoring_s"),
        peak_rss_mb=round(peak),
        rss_vs_model=round(peak / (total * 1000), 3),
        rss_vs_layer=round(peak / (layer * 1000), 2),
    )


def _removed(record: dict) -> str:
    plan = record["plan"]
    if not plan.get("experts"):
        return "block " + ",".join(map(str, plan["blocks"]))
    removed = {len(plan["experts"][i]) for i, n in enumerate(plan["num_experts"]) if n}
    return f"{'/'.join(map(str, sorted(removed)))} experts per layer"


COLUMNS = [
    ("step", "step"),
    ("layers", "layers"),
    ("removed", "removed"),
    ("input_gb", "checkpoint GB"),
    ("output_gb", "output GB"),
    ("layer_gb", "one layer GB (bf16)"),
    ("wall_s", "wall s"),
    ("scoring_s", "scoring s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("rss_vs_model", "RSS / checkpoint"),
    ("rss_vs_layer", "RSS / one layer"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/secateurs-moe-lazy"))
    parser.add_argument("--n-samples", type=int, default=4, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=128, help="calibration window length")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = parser.parse_args()
    calib = ["--n-samples", str(args.n_samples), "--calib-seq-len", str(args.seq_len)]
    rows = []
    for layers in args.layers:
        source = args.work / f"olmoe-shaped-{layers}"
        command = [sys.executable, __file__, "--write-only", str(source), str(layers)]
        seconds, peak = run_measured(command)
        print(f"wrote {sizes(source)[0]:.2f} GB in {seconds:.0f} s (peak RSS {peak:,.0f} MB)")
        for number, (name, flags) in enumerate(STEPS.items(), start=1):
            rows.append(run_step(name, flags, source, args.work / f"out-{number}", calib))
            print(rows[-1], flush=True)
        tensors = sizes(source)[2]
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    protocol = {
        "layers": args.layers,
        "calibration": f"C4, {args.n_samples} windows x {args.seq_len} tokens",
        "compute_dtype": "bfloat16",
        "layer_tensors_on_disk": tensors,
    }
    data = {"model": OLMOE_SHAPED, "protocol": protocol, "rows": rows}
    write_results("moe-lazy", data, markdown_table(rows, COLUMNS))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--write-only":
        write_random_checkpoint(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
