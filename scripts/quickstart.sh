#!/usr/bin/env bash
# Fresh machine → the best depth-pruned SmolLM2-135M the project makes today (6 of 30 blocks,
# `ppl+` chosen by an iterative search, healed in closed form) in runs/quickstart, with its
# model card (README.md), its perplexity next to the dense model's, greedy generations of both
# side by side, and a report (runs/quickstart-report/index.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Evaluation/calibration data: $SECATEURS_DATA_DIR, else ../shared/data if present, else the hub.
if [ -z "${SECATEURS_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export SECATEURS_DATA_DIR=$(cd ../shared/data && pwd)
fi
OUT=${OUT:-runs/quickstart}
secateurs prune smollm2-135m --unit block --criterion ppl+ --iterative --heal --remove 6 \
  --out "$OUT" --overwrite
# dense and pruned in one process; --save keeps both for the report and the model card
secateurs eval ppl smollm2-135m "$OUT" --dataset wikitext2 --max-windows 64 --save
echo "Greedy generations, dense and pruned (distinct-2: 1 = no repeated word pair):"
secateurs eval generate smollm2-135m "$OUT" --save
secateurs report "$OUT" --out "$OUT-report"
echo "Model card: $OUT/README.md"
