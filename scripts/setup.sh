#!/usr/bin/env bash
# Set up what cifar_dist needs, idempotently, in a virtual environment (.venv, or $VENV).
#
#   scripts/setup.sh --lean   what training needs: the package and its dependencies (torch,
#                             torchvision, accelerate and light ones); nothing else. `make train`.
#   scripts/setup.sh          everything the tests need besides: the dev extra (pytest, ruff,
#                             tensorboard, ...), DeepSpeed, FFCV and, when running as root, the
#                             Debian packages FFCV and the local Slurm harness need (pkg-config,
#                             libturbojpeg, OpenCV, slurmctld, slurmd, slurm-client, munge;
#                             otherwise the exact apt-get command is printed). `make test`.
#
# Re-running does nothing when pyproject.toml and this script have not changed. A lean
# environment becomes a full one on the first full set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
MODE=full
[ "${1:-}" = "--lean" ] && MODE=lean
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
full_stamp="$VENV/.cifar_dist-installed"
lean_stamp="$VENV/.cifar_dist-installed-lean"
if [ "$(cat "$full_stamp" 2>/dev/null)" = "$want" ]; then
  exit 0  # a full environment serves both
fi
if [ "$MODE" = lean ] && [ "$(cat "$lean_stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

if [ "$MODE" = full ]; then
  DEBS="pkg-config libturbojpeg0-dev libopencv-dev slurmctld slurmd slurm-client munge"
  missing=()
  if command -v dpkg >/dev/null 2>&1; then
    for pkg in $DEBS; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
  fi
  if ((${#missing[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "setup: installing Debian packages for FFCV and the Slurm tests: ${missing[*]}"
      apt-get update -q >/dev/null
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: FFCV and the Slurm tests need Debian packages; run:"
      echo "  sudo apt-get install --no-install-recommends ${missing[*]}"
    fi
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
if [ "$MODE" = lean ]; then
  echo "setup: installing cifar_dist and what training needs into $VENV (the test tools: make test)"
  "$VENV/bin/pip" install -q -e .
  echo "$want" > "$lean_stamp"
  echo "setup: done ($VENV, lean)"
  exit 0
fi
echo "setup: installing cifar_dist with its dev, deepspeed, export and tune extras into $VENV"
"$VENV/bin/pip" install -q -e ".[dev,deepspeed,export,tune]"
if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  echo "setup: building FFCV"
  "$VENV/bin/pip" install -q -e ".[ffcv]" || echo "setup: FFCV failed to build; data.loader=ffcv stays unavailable"
else
  echo "setup: FFCV skipped (needs pkg-config, libturbojpeg0-dev, libopencv-dev); data.loader=ffcv stays unavailable"
fi
echo "$want" > "$full_stamp"
echo "$want" > "$lean_stamp"
echo "setup: done ($VENV)"
