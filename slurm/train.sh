#!/bin/bash
# Train on a Slurm cluster: one `accelerate launch` per node, one process per GPU.
#
#   mkdir -p logs
#   sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]
#   sbatch --nodes=4 slurm/train.sh configs/fast.yaml
#   sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=8 slurm/train.sh configs/smoke.yaml   # CPU nodes (gloo)
#
# Options given to sbatch override the #SBATCH defaults below. Submit from the
# repository (or set CIFAR_DIST_REPO); the run directory must be on a file system
# every node sees. It is runs/<job name>-<job id> unless run.out_dir=DIR, --out DIR
# or CIFAR_DIST_OUT=DIR says otherwise, and it stays the same when the job is
# requeued: the script always passes --resume, so a requeued job continues from
# its newest checkpoint.
#
# Preemption: Slurm sends USR1 120 s before the time limit (--signal below); USR1 or
# TERM sent to the job's steps (`scancel --signal=USR1 JOBID`, a preemption grace
# period) makes training finish its step, agree across ranks, write a checkpoint and
# exit; this script then requeues the job (`scontrol requeue`) and the requeued job
# resumes. CIFAR_DIST_REQUEUE=0 stops after the checkpoint without requeueing.
# Other settings (CIFAR_DIST_VENV, CIFAR_DIST_CPU_PROCS, ...): see slurm/common.sh.
#
#SBATCH --job-name=cifar-dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# --ntasks-per-node=1: one launcher per node; it starts the processes itself.
# --gpus-per-node: processes per node = GPUs on the node; 0 for CPU nodes, which then
#   run CIFAR_DIST_CPU_PROCS (default 1) gloo processes each.
# --cpus-per-task: all of the node's cores, shared by its processes (OMP threads and loaders).
# --signal=USR1@120: to the job steps (not B:USR1), i.e. to the training processes, which
#   checkpoint; give it more than 120 s if a checkpoint plus 10 steps takes longer.
# --open-mode=append: a requeued job appends to the same log.

set -uo pipefail

[ $# -ge 1 ] || { echo "usage: sbatch [sbatch options] slurm/train.sh CONFIG [key=value ...]" >&2; exit 2; }
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

CONFIG=$1; shift
cifar_dist_run_dir "runs/${SLURM_JOB_NAME:-cifar-dist}-${SLURM_JOB_ID:-local}" "$@"
cifar_dist_setup
REQUEUE=${CIFAR_DIST_REQUEUE:-1}
export CIFAR_DIST_REQUEUE=0  # the training processes do not requeue: this script does, once all have exited
rm -f "$RUN_DIR/PREEMPTED"
cifar_dist_describe
cifar_dist_traps

cifar_dist_launch "$REPO/cifar_dist/train.py" --config "$CONFIG" --out "$RUN_DIR" --resume \
    run.progress=false "${ARGS[@]}"

if [ -f "$RUN_DIR/PREEMPTED" ]; then
    # Every rank has written its part of the checkpoint and left (rank 0 writes PREEMPTED
    # only then). srun may still report a failure: Slurm marks tasks sent TERM as killed.
    if [ "$REQUEUE" = 0 ]; then
        cifar_dist_say "stopped at a checkpoint (srun status $RC); CIFAR_DIST_REQUEUE=0: not requeueing." \
            "Continue with: sbatch slurm/train.sh $CONFIG run.out_dir=$RUN_DIR ..."
        exit 0
    fi
    cifar_dist_say "stopped at a checkpoint (srun status $RC); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    cifar_dist_say "scontrol requeue failed (the job is ending anyway?); continue with:" \
        "sbatch slurm/train.sh $CONFIG run.out_dir=$RUN_DIR ..."
    exit 1
fi
if [ "$RC" -ne 0 ]; then
    cifar_dist_say "training failed (srun status $RC); see the errors above. Its checkpoints are in $RUN_DIR"
fi
exit "$RC"
