#!/usr/bin/env bash
# The anchors' block selections and ours (ppl+ --iterative, found by benchmarks/depth.py), each
# with and without --heal, evaluated on the first 512 windows of WikiText-2 and PTB (seq 128, one
# BOS at the stream start): the protocol of issue #10. Writes benchmarks/results/depth-512-anchors.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export SECATEURS_DATA_DIR=${SECATEURS_DATA_DIR:-../shared/data} OMP_NUM_THREADS=1
R=${RUNS:-runs/depth-512}; OUT=benchmarks/results
declare -A SEL=(
  [sl6]=12,13,14,16,17,18
  [sl10]=4,5,7,12,13,14,16,17,18,26
  [sg6]=13,14,15,17,25,26
  [sg10]=3,5,12,13,14,15,16,17,25,26
  [ours10]=4,5,12,13,14,15,16,17,18,26
  [ourskl6]=13,14,15,16,17,18
)
models=(smollm2-135m)
for name in sl6 sl10 sg6 sg10 ours10 ourskl6; do
  secateurs prune smollm2-135m --blocks "${SEL[$name]}" --out $R/$name --overwrite >/dev/null
  secateurs prune smollm2-135m --blocks "${SEL[$name]}" --heal --out $R/$name-heal --overwrite >/dev/null
  models+=($R/$name $R/$name-heal)
done
secateurs eval ppl "${models[@]}" --dataset wikitext2,ptb --max-windows 512 --json > $OUT/depth-512-anchors.json
python - <<'PY'
import json

runs = {m["model"].split("/")[-1]: m["results"] for m in
        json.load(open("benchmarks/results/depth-512-anchors.json"))["models"]}
rows = [("smollm2-135m", "dense"), ("sl6", "Shortened LLaMA 6 (= ours, objective nll)"),
        ("ourskl6", "ours ppl+ --iterative 6 (objective kl, the default)"),
        ("sg6", "ShortGPT 6"), ("sl10", "Shortened LLaMA 10"), ("sg10", "ShortGPT 10"),
        ("ours10", "ours ppl+ --iterative 10 (either objective)")]
lines = ["| selection | unhealed WikiText-2 | unhealed PTB | --heal WikiText-2 | --heal PTB |",
         "|---|---:|---:|---:|---:|"]
for key, label in rows:
    cells = [runs.get(k, {}).get(d, {}).get("ppl") for k in (key, key + "-heal")
             for d in ("wikitext2", "ptb")]
    lines.append(f"| {label} | " + " | ".join(f"{c:.2f}" if c else "–" for c in cells) + " |")
header = ("SmolLM2-135M; first 512 windows of WikiText-2 test / PTB, seq 128, one BOS at the "
          "stream start; --heal fits on 64 C4 windows, seed 0. Produced by `bash "
          "benchmarks/depth_512.sh` (explicit --blocks, no scoring); ours are the blocks "
          "`ppl+ --iterative` chose at calibration seed 0 (benchmarks/results/depth.md with objective "
          "nll, depth-search-objective.md with kl).")
text = header + "\n\n" + "\n".join(lines) + "\n"
open("benchmarks/results/depth-512-anchors.md", "w").write(text)
print(text)
PY
