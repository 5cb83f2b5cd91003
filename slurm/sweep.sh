#!/bin/bash
# One member of a sweep per task of a Slurm job array, each with slurm/train.sh's
# preemption and requeue behaviour.
#
#   cifar-dist sweep --config configs/fast.yaml --seeds 8 train.lr=0.1,0.2 --out runs/lr --plan-only
#   sbatch --array=0-15 slurm/sweep.sh runs/lr          # the plan prints the range
#   sbatch --array=0-15%4 slurm/sweep.sh runs/lr        # at most 4 members at once
#   cifar-dist compare runs/lr
#
# Task i reads SWEEP_DIR/array/i.args (written by --plan-only: the config, the member's
# overrides and its run directory) and runs slurm/train.sh with them, so a preempted
# task checkpoints, is requeued and resumes like any training job. Extra arguments
# (key=value) are passed to every member. Options given to sbatch override the
# defaults below: one GPU per member.
#
#SBATCH --job-name=cifar-dist-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -uo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch --array=0-N slurm/sweep.sh SWEEP_DIR [key=value ...]" >&2; exit 2; }
SWEEP=$1; shift
TASK=${SLURM_ARRAY_TASK_ID:-}
[ -n "$TASK" ] || { echo "cifar-dist slurm: run as a job array: sbatch --array=0-N slurm/sweep.sh $SWEEP" >&2; exit 2; }
ARGS_FILE="$SWEEP/array/$TASK.args"
[ -f "$ARGS_FILE" ] || {
    echo "cifar-dist slurm: $ARGS_FILE: missing; plan the sweep first (cifar-dist sweep ... --plan-only --out $SWEEP)" >&2
    exit 2
}
mapfile -t MEMBER < "$ARGS_FILE"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TRAIN="$HERE/train.sh"
if [ ! -f "$TRAIN" ]; then  # sbatch runs a copy of this script: find the repository's
    for c in "${CIFAR_DIST_REPO:-}" "${SLURM_SUBMIT_DIR:-}"; do
        [ -n "$c" ] && [ -f "$c/slurm/train.sh" ] && { TRAIN="$c/slurm/train.sh"; break; }
    done
fi
[ -f "$TRAIN" ] || { echo "cifar-dist slurm: cannot find slurm/train.sh: submit from the repository or set CIFAR_DIST_REPO" >&2; exit 2; }
echo "cifar-dist slurm: sweep $SWEEP, task $TASK: ${MEMBER[*]:1}"
exec bash "$TRAIN" "${MEMBER[@]}" "$@"
