#!/usr/bin/env bash
# Set up (if needed) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
# Evaluation/calibration data: $SECATEURS_DATA_DIR, else ../shared/data if present, else the hub.
if [ -z "${SECATEURS_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export SECATEURS_DATA_DIR=$(cd ../shared/data && pwd)
fi
# Tiny test models run fastest on one thread (thread start-up dominates their tiny matmuls).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest -q "$@"
