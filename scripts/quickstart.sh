#!/usr/bin/env bash
# Fresh machine → a depth-pruned SmolLM2-135M in runs/quickstart, its perplexity next to the
# dense model's, and a report (runs/quickstart-report/index.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# Evaluation/calibration data: $SECATEURS_DATA_DIR, else ../shared/data if present, else the hub.
if [ -z "${SECATEURS_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export SECATEURS_DATA_DIR=$(cd ../shared/data && pwd)
fi
OUT=${OUT:-runs/quickstart}
secateurs prune smollm2-135m --unit block --criterion ppl+ --remove 6 --out "$OUT" --overwrite
# dense and pruned in one process; --save keeps both for the report (dense point, warnings)
secateurs eval ppl smollm2-135m "$OUT" --dataset wikitext2 --max-windows 64 --save
secateurs report "$OUT" --out "$OUT-report"
