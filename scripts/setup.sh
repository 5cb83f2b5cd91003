#!/usr/bin/env bash
# Set up everything cifar_dist needs, idempotently:
#   - Debian packages for FFCV (pkg-config, libturbojpeg, OpenCV) and for the
#     Slurm tests (slurmctld, slurmd, slurm-client, munge): installed when
#     running as root, otherwise the exact apt-get command is printed;
#   - a virtual environment (.venv, or $VENV) with the package and its extras.
# Re-running does nothing when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEBS="pkg-config libturbojpeg0-dev libopencv-dev slurmctld slurmd slurm-client munge"

missing=()
if command -v dpkg >/dev/null 2>&1; then
  for pkg in $DEBS; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
fi
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: FFCV and the Slurm tests need Debian packages; run:"
    echo "  sudo apt-get install --no-install-recommends ${missing[*]}"
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.cifar_dist-installed"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
"$VENV/bin/pip" install -q --upgrade pip
echo "setup: installing cifar_dist with its dev and deepspeed extras into $VENV"
"$VENV/bin/pip" install -q -e ".[dev,deepspeed]"
if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then
  echo "setup: building FFCV"
  "$VENV/bin/pip" install -q -e ".[ffcv]" || echo "setup: FFCV failed to build; data.loader=ffcv stays unavailable"
else
  echo "setup: FFCV skipped (needs pkg-config, libturbojpeg0-dev, libopencv-dev); data.loader=ffcv stays unavailable"
fi
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
