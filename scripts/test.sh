#!/usr/bin/env bash
# Set up (if needed) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >/dev/null
. .venv/bin/activate
export SECATEURS_DATA_DIR=${SECATEURS_DATA_DIR:-$(cd .. && pwd)/shared/data}
python -m pytest -q "$@"
