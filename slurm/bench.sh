#!/bin/bash
# The throughput benchmark (python -m cifar_dist.bench) as a Slurm job on 1 or N nodes.
#
#   mkdir -p logs
#   sbatch [sbatch options] slurm/bench.sh [bench options] [key=value ...]
#   sbatch slurm/bench.sh --compile off,on --precision bf16 --channels-last on --batch-sizes 256
#   sbatch --nodes=2 slurm/bench.sh --precision bf16 --out runs/bench-2nodes
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=8 slurm/bench.sh --config configs/smoke.yaml
#
# Takes every option of `cifar-dist bench` (see `cifar-dist bench --help`). Each row is
# timed on all of the job's processes, then on rank 0 alone, which gives the scaling
# efficiency; the plain PyTorch baseline runs on rank 0. The table (bench.md), bench.json
# and bench.png go into the run directory: --out DIR, or CIFAR_DIST_OUT=DIR, else
# runs/<job name>-<job id>; the table is also printed into the job's log.
# A benchmark is not preemption-safe: an interrupted job is not requeued; submit it again.
# Other settings (CIFAR_DIST_VENV, CIFAR_DIST_CPU_PROCS, ...): see slurm/common.sh.
#
#SBATCH --job-name=cifar-dist-bench
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=00:30:00
#SBATCH --exclusive
#SBATCH --no-requeue
#SBATCH --output=logs/%x-%j.out
#
# --exclusive: other jobs on the same nodes would distort the figures.
# --gpus-per-node: processes per node = GPUs on the node; 0 for CPU nodes, which then
#   run CIFAR_DIST_CPU_PROCS (default 1) gloo processes each.

set -uo pipefail

# The same lookup as train.sh: sbatch runs a copy of this script from its spool directory,
# so the repository (and common.sh in it) must be found before anything can be sourced.
REPO=$(
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    for c in "${CIFAR_DIST_REPO:-}" "$here/.." "${SLURM_SUBMIT_DIR:-}"; do
        [ -n "$c" ] && [ -f "$c/slurm/common.sh" ] && { (cd "$c" && pwd); exit 0; }
    done
    cmd=$(scontrol show job -o "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/common.sh" ] && (cd "$(dirname "$cmd")/.." && pwd)
) || { echo "cifar-dist slurm: cannot find the repository: submit from it or set CIFAR_DIST_REPO" >&2; exit 2; }
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh"

cifar_dist_run_dir "runs/${SLURM_JOB_NAME:-cifar-dist-bench}-${SLURM_JOB_ID:-local}" "$@"
cifar_dist_setup
cifar_dist_describe

cifar_dist_launch -m cifar_dist.bench --out "$RUN_DIR" "${ARGS[@]}"

if [ "$RC" -ne 0 ]; then
    cifar_dist_say "benchmark failed (srun status $RC); see the errors above"
elif [ -f "$RUN_DIR/bench.md" ]; then
    cifar_dist_say "table: $RUN_DIR/bench.md (figures: $RUN_DIR/bench.json, chart: $RUN_DIR/bench.png)"
else
    cifar_dist_say "the benchmark ended without writing $RUN_DIR/bench.md"; RC=1
fi
exit "$RC"
