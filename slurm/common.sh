# Shared by slurm/train.sh and slurm/bench.sh (sourced, never run on its own).
#
# Works out, in the batch shell (which runs on the job's first node):
#   the venv's accelerate, the main process address and port, CPU or GPU mode,
#   the processes per node, and the run directory;
# then starts one `accelerate launch` per node with srun and waits for it.
#
# Settings (environment variables, all optional):
#   CIFAR_DIST_VENV             virtualenv with cifar_dist installed (default: REPO/.venv when it
#                               exists, else the environment the job was submitted from:
#                               $VIRTUAL_ENV, $CONDA_PREFIX, or the accelerate on PATH)
#   CIFAR_DIST_PROCS_PER_NODE   processes per node (default: the GPUs Slurm gave the job on a node,
#                               else CIFAR_DIST_CPU_PROCS CPU processes)
#   CIFAR_DIST_CPU_PROCS        CPU processes (gloo) per node on nodes without GPUs (default 1)
#   CIFAR_DIST_LAUNCH_CONFIG    accelerate config (default launch/multi_node.yaml, launch/cpu.yaml on CPU)
#   CIFAR_DIST_MASTER_ADDR      address of the main process (default: NodeAddr of the first node)
#   CIFAR_DIST_PORT             its port (default 15000 + job id % 15000: stable across requeues)
#   CIFAR_DIST_OUT              run directory (default: run.out_dir=/--out from the arguments, else
#                               runs/<job name>-<job id>, which a requeued job keeps)

cifar_dist_say() { echo "cifar-dist slurm: $*"; }
cifar_dist_die() { echo "cifar-dist slurm: $*" >&2; exit 2; }

# How many GPUs this job has on a node: Slurm's count, else the devices it made visible.
cifar_dist_gpus() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    case "${CUDA_VISIBLE_DEVICES:-}" in
        "" | NoDevFiles | -1) echo 0 ;;
        *) echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . ;;
    esac
}

# An address of NODE that the other nodes can reach: its NodeAddr in slurm.conf. (The node
# name itself need not resolve, e.g. several emulated nodes on one host.)
cifar_dist_node_addr() {
    local addr
    addr=$(scontrol show node "$1" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n 1)
    echo "${addr:-$1}"
}

# Sets RUN_DIR and ARGS (the arguments with any --out removed) from "$@".
cifar_dist_run_dir() {
    local default=$1; shift
    local out="" arg
    ARGS=()
    while [ $# -gt 0 ]; do
        arg=$1; shift
        case "$arg" in
            --out) out=${1:-}; shift ;;
            --out=*) out=${arg#--out=} ;;
            run.out_dir=*) out=${arg#run.out_dir=}; ARGS+=("$arg") ;;
            *) ARGS+=("$arg") ;;
        esac
    done
    RUN_DIR=${CIFAR_DIST_OUT:-${out:-$default}}
    RUN_DIR=$(realpath -m -- "$RUN_DIR")
}

# The accelerate to launch with, and where it comes from (said in the job log):
# CIFAR_DIST_VENV, else REPO/.venv, else the submitting environment (sbatch exports it).
cifar_dist_find_accelerate() {
    local env from
    if [ -n "${CIFAR_DIST_VENV:-}" ]; then env=$CIFAR_DIST_VENV; from="CIFAR_DIST_VENV"
    elif [ -x "$REPO/.venv/bin/accelerate" ]; then env=$REPO/.venv; from="the repository's .venv"
    elif [ -n "${VIRTUAL_ENV:-}" ]; then env=$VIRTUAL_ENV; from="the submitting environment (VIRTUAL_ENV)"
    elif [ -n "${CONDA_PREFIX:-}" ]; then env=$CONDA_PREFIX; from="the submitting environment (CONDA_PREFIX)"
    fi
    if [ -n "${env:-}" ]; then
        ACCELERATE=$env/bin/accelerate
        [ -x "$ACCELERATE" ] || cifar_dist_die "$ACCELERATE not found ($from): set CIFAR_DIST_VENV to the environment with cifar_dist"
    else
        ACCELERATE=$(command -v accelerate) || cifar_dist_die "no accelerate: set CIFAR_DIST_VENV, create REPO/.venv (make setup), or submit from an environment with cifar_dist"
        from="PATH"
    fi
    cifar_dist_say "using $ACCELERATE (from $from)"
}

cifar_dist_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || cifar_dist_die "not inside a Slurm job: submit with sbatch"
    cifar_dist_find_accelerate
    NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local head
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    MASTER_ADDR_=${CIFAR_DIST_MASTER_ADDR:-$(cifar_dist_node_addr "$head")}
    PORT=${CIFAR_DIST_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
    local gpus
    gpus=$(cifar_dist_gpus)
    if [ -n "${CIFAR_DIST_PROCS_PER_NODE:-}" ]; then
        PER_NODE=$CIFAR_DIST_PROCS_PER_NODE
        [ "$gpus" -gt 0 ] && MODE=gpu || MODE=cpu
    elif [ "$gpus" -gt 0 ]; then
        MODE=gpu; PER_NODE=$gpus
    else
        MODE=cpu; PER_NODE=${CIFAR_DIST_CPU_PROCS:-1}
    fi
    if [ "$MODE" = gpu ]; then
        LAUNCH_CONFIG=${CIFAR_DIST_LAUNCH_CONFIG:-$REPO/launch/multi_node.yaml}
    else
        LAUNCH_CONFIG=${CIFAR_DIST_LAUNCH_CONFIG:-$REPO/launch/cpu.yaml}
        export CUDA_VISIBLE_DEVICES=""  # GPUs Slurm did not give this job are not ours to use
    fi
    TOTAL=$((PER_NODE * NNODES))
    CPUS=${SLURM_CPUS_PER_TASK:-1}
    THREADS=$((CPUS / PER_NODE)); [ "$THREADS" -ge 1 ] || THREADS=1
}

cifar_dist_describe() {
    cifar_dist_say "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${NNODES} node(s) ${SLURM_JOB_NODELIST}:" \
        "${PER_NODE} ${MODE^^} process(es) per node, ${TOTAL} in all, main process ${MASTER_ADDR_}:${PORT}," \
        "${THREADS} thread(s) each; run dir ${RUN_DIR}"
}

# Keep the batch shell alive through the signals the training processes handle: it must
# wait for them to checkpoint before it decides to requeue. A USR1 meant for the batch
# shell (--signal=B:USR1@..., scancel --batch) is passed on to the training processes,
# and a STOP file asks them too (they look for it at every step).
cifar_dist_traps() {
    trap 'cifar_dist_say "batch shell got USR1: asking the training processes to checkpoint and stop"
          touch "$RUN_DIR/STOP" 2>/dev/null; scancel --signal=USR1 "$SLURM_JOB_ID"' USR1
    trap 'cifar_dist_say "batch shell got TERM: waiting for the training processes"
          touch "$RUN_DIR/STOP" 2>/dev/null' TERM
}

# srun one `accelerate launch SCRIPT ARGS...` per node, wait for it; sets RC.
#  - $SLURM_NODEID is expanded on each node (single quotes): each node is its own machine rank.
#  - The launcher ignores USR1 and TERM (and torch's agent is told not to handle TERM):
#    Slurm signals every process of the step, the training processes checkpoint and exit 0,
#    and the launcher must outlive them instead of tearing them down (or dying of USR1).
#  - --kill-on-bad-exit=1: one dead rank ends the whole step at once instead of a hang.
cifar_dist_launch() {
    export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT
    srun --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
        --kill-on-bad-exit=1 \
        bash -c 'trap "" USR1 TERM; exec "$0" launch --machine_rank "$SLURM_NODEID" "$@"' \
        "$ACCELERATE" --config_file "$LAUNCH_CONFIG" --num_machines "$NNODES" --num_processes "$TOTAL" \
        --main_process_ip "$MASTER_ADDR_" --main_process_port "$PORT" \
        --num_cpu_threads_per_process "$THREADS" "$@" &
    local pid=$! again
    while :; do
        wait "$pid"; RC=$?
        # >128: srun's own status, or a trapped signal interrupted `wait`.
        if [ "$RC" -le 128 ]; then break; fi
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid"; again=$?
            [ "$again" -eq 127 ] || RC=$again
            break
        fi
    done
}
