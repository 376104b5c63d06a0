#!/usr/bin/env bash
# Create .venv/ in the repo root with lmpipe installed in editable mode (plus test extras).
# torch is installed first as torch==2.13.0 (a CPU build on machines without CUDA); set
# LMPIPE_SKIP_TORCH=1 to keep a torch you installed yourself (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lmpipe needs Python >= 3.11")'
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --disable-pip-version-check --upgrade "pip>=24"
if [ "${LMPIPE_SKIP_TORCH:-0}" != "1" ] && ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  $PIP install --quiet --disable-pip-version-check "torch==2.13.0"
fi
$PIP install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
echo "lmpipe installed in .venv ($(.venv/bin/python -c 'import ray, torch; print("ray", ray.__version__, "torch", torch.__version__)'))"
