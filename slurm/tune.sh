#!/bin/bash
# One worker of a `cifar-dist tune` search per task of a Slurm job array; the workers share the
# study in the tuning directory (a shared filesystem) and never take the same trial.
#
#   sbatch --array=0-7 slurm/tune.sh --config configs/fast.yaml --space space.yaml --trials 64 --out runs/tune
#   cifar-dist tune --out runs/tune --best 3
#
# Each task runs `cifar-dist tune ARGS` with one worker (its trials on the task's GPU, or its
# CPUs). Before a preemption Slurm sends USR1 (--signal below): the worker asks its trial to
# checkpoint, exits, and the task is requeued; a requeued task (or any other worker) takes the
# trial up again from its checkpoint. Options given to sbatch override the defaults below.
#
#SBATCH --job-name=cifar-dist-tune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -uo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch --array=0-N slurm/tune.sh --space SPACE --trials N --out DIR [...]" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${CIFAR_DIST_REPO:-$(cd "$HERE/.." && pwd)}
[ -f "$REPO/slurm/common.sh" ] || REPO=${SLURM_SUBMIT_DIR:-$REPO}  # sbatch runs a copy of this script
# shellcheck source=slurm/common.sh
source "$REPO/slurm/common.sh" || { echo "cifar-dist slurm: cannot find slurm/common.sh: set CIFAR_DIST_REPO" >&2; exit 2; }
cifar_dist_find_accelerate
CIFAR_DIST=$(dirname "$ACCELERATE")/cifar-dist
[ -x "$CIFAR_DIST" ] || cifar_dist_die "$CIFAR_DIST not found beside $ACCELERATE"
cifar_dist_say "tune worker, array task ${SLURM_ARRAY_TASK_ID:-none} of job ${SLURM_JOB_ID:-none}"

"$CIFAR_DIST" tune "$@" --parallel 1 &
WORKER=$!
trap 'kill -USR1 "$WORKER" 2>/dev/null' USR1
trap 'kill -TERM "$WORKER" 2>/dev/null' TERM
wait "$WORKER"; CODE=$?
while kill -0 "$WORKER" 2>/dev/null; do wait "$WORKER"; CODE=$?; done  # a trap interrupted the wait
if [ "$CODE" -eq $((128 + 10)) ] && [ -n "${SLURM_JOB_ID:-}" ]; then  # stopped by USR1: a preemption is coming
    cifar_dist_say "requeueing ${SLURM_JOB_ID}: the next worker resumes the trial from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$CODE"
