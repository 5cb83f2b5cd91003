#!/usr/bin/env bash
# The CPU ablation of the fast recipe's pieces (docs/reproducing.md): the CPU demo
# (configs/cpu_quick.yaml, 2 epochs) as the baseline, each piece added alone, then all of them
# (configs/cpu_fast.yaml), 3 seeds each, then `cifar-dist compare` over the six sweeps.
#
#   bash scripts/ablation.sh [OUT]        (default runs/ablation; about 20 minutes on 2 cores)
#
# Running it again resumes: finished members are skipped. CIFAR_DIST_DATA names the data.
set -euo pipefail
OUT=${1:-runs/ablation}
BIN=${VENV:-.venv}/bin
SEEDS=${SEEDS:-3}
sweep() { "$BIN/cifar-dist" sweep --seeds "$SEEDS" --out "$OUT/$1" --config "${@:2}"; }

sweep baseline configs/cpu_quick.yaml
sweep ema configs/cpu_quick.yaml train.ema.decay=0.98 eval.use_ema=true
sweep tta configs/cpu_quick.yaml eval.tta=flip_translate
sweep no_decay configs/cpu_quick.yaml "train.no_decay=[norm, bias]"
sweep lookahead configs/cpu_quick.yaml train.lookahead.k=5 train.lookahead.alpha=0.5
sweep all configs/cpu_fast.yaml
"$BIN/cifar-dist" compare "$OUT"/baseline "$OUT"/ema "$OUT"/tta "$OUT"/no_decay "$OUT"/lookahead "$OUT"/all \
  --out "$OUT"
