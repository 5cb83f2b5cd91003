#!/usr/bin/env bash
# `make gpu-check`: the GPU path end to end on one NVIDIA GPU, with the machine's own
# PyTorch (nothing is installed, nothing downloaded). See scripts/gpu_check.py.
#   bash scripts/gpu_check.sh [--full] [--out DIR] [--archive cifar10-jpeg.tar.gz] [--dry-run]
# Python: $PYTHON, else the project's .venv when there is one, else python3 on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
