# shellcheck shell=bash
# Shared launcher logic, sourced by slurm/{stage1,embed,stage2,eval}.sh. See docs/SLURM.md.
#
# A stage script calls:   l2c_main ENTRY_SCRIPT CONFIG_MODE "$@"
#   ENTRY_SCRIPT  path of the python entry point relative to the repo root (tools/train_stage1.py)
#   CONFIG_MODE   "config": first positional argument is the config, passed as `--config CFG`
#                 "raw":    all arguments are passed through verbatim
#
# Launch modes (LLM2CLIP_LAUNCHER, default auto):
#   srun      one task per GPU: `srun ... python ENTRY args`, rank/world from SLURM_* (and mirrored
#             into RANK/LOCAL_RANK/WORLD_SIZE), MASTER_ADDR/MASTER_PORT exported. auto picks it in
#             a batch script or an salloc shell (SLURM_JOB_ID set, no SLURM_STEP_ID).
#   torchrun  `python -m torch.distributed.run --standalone --nproc_per_node=N ENTRY args` on one
#             machine. auto picks it outside Slurm and inside a job step (srun --pty bash).
#   python    a single plain process (debugging).
#
# Exit code 42 from the entry point means "checkpointed, requeue me": in a batch job the launcher
# runs `scontrol requeue $SLURM_JOB_ID`; any other code is the job's exit code.

L2C_REQUEUE_EXIT=42

l2c_log() { printf '[llm2clip %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
l2c_die() { l2c_log "error: $*"; exit 2; }

# Print a command as a shell-quoted line (copy-pasteable).
l2c_quote() {
    local out="" a
    for a in "$@"; do out+="$(printf '%q' "$a") "; done
    printf '%s' "${out% }"
}

l2c_usage() {
    local a="[ARGS...]" c=""
    [[ $L2C_CONFIG_MODE == config ]] && { a="CONFIG [ARGS...]"; c="--config CONFIG "; }
    cat >&2 <<EOF
usage: sbatch [SBATCH OPTIONS] $L2C_SCRIPT_NAME [--dry-run] $a
       bash $L2C_SCRIPT_NAME [--dry-run] $a
Runs \$PYTHON $L2C_ENTRY_DEFAULT ${c}[ARGS...] on every task (one per GPU).
Environment: LLM2CLIP_LAUNCHER, LLM2CLIP_DRY_RUN, LLM2CLIP_ENTRY, PYTHON, NPROC_PER_NODE,
MASTER_PORT, LLM2CLIP_SRUN_ARGS, LLM2CLIP_ENV_FILE, NCCL_*, OMP_NUM_THREADS: see docs/SLURM.md.
EOF
}

# Resolve the entry point: LLM2CLIP_ENTRY (absolute, relative to $PWD, or relative to the repo)
# or the stage's default tool.
l2c_resolve_entry() {
    local e=${LLM2CLIP_ENTRY:-$L2C_ENTRY_DEFAULT}
    if [[ $e == /* ]]; then
        printf '%s' "$e"
    elif [[ -n ${LLM2CLIP_ENTRY:-} && -f $PWD/$e ]]; then
        printf '%s' "$PWD/$e"
    else
        printf '%s' "$LLM2CLIP_ROOT/$e"
    fi
}

# Hostnames of the allocation, one per line (first = MASTER_ADDR).
l2c_hostnames() {
    command -v scontrol >/dev/null 2>&1 || l2c_die "scontrol not found: cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
}

# Environment every task gets; defaults only where the user has not set a value.
l2c_export_env() {
    export PYTHONUNBUFFERED=1
    export PYTHONPATH="$LLM2CLIP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    # NCCL: no site values here. NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_DEBUG, ... set in the
    # submitting shell or in LLM2CLIP_ENV_FILE reach every task unchanged (sbatch/srun --export=ALL).
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# Variables worth showing in the banner / dry run.
l2c_env_summary() {
    local v
    for v in $(compgen -e | grep -E '^(NCCL_|TORCH_NCCL_|GLOO_|CUDA_VISIBLE_DEVICES$|OMP_NUM_THREADS$|PYTHONPATH$)' | sort); do
        printf '%s=%q\n' "$v" "${!v}"
    done
}

l2c_main() {
    L2C_ENTRY_DEFAULT=$1
    L2C_CONFIG_MODE=$2
    shift 2
    L2C_SCRIPT_NAME=${L2C_SCRIPT_NAME:-$0}

    # Launcher options come before the config; everything after is the entry point's.
    local dry_run=${LLM2CLIP_DRY_RUN:-0}
    while [[ $# -gt 0 ]]; do
        case $1 in
            --dry-run) dry_run=1; shift ;;
            -h|--help) l2c_usage; return 0 ;;
            --) shift; break ;;
            *) break ;;
        esac
    done
    [[ $dry_run == 1 || $dry_run == true ]] && dry_run=1 || dry_run=0

    if [[ -n ${LLM2CLIP_ENV_FILE:-} ]]; then
        [[ -f $LLM2CLIP_ENV_FILE ]] || l2c_die "LLM2CLIP_ENV_FILE=$LLM2CLIP_ENV_FILE does not exist"
        # Activation scripts (conda, modules) often reference unset variables: relax -u for them.
        set +u
        # shellcheck disable=SC1090
        source "$LLM2CLIP_ENV_FILE"
        set -u
    fi

    local -a args
    if [[ $L2C_CONFIG_MODE == config ]]; then
        if [[ $# -lt 1 || $1 == -* ]]; then
            l2c_usage
            l2c_die "missing CONFIG (first argument), e.g. $L2C_SCRIPT_NAME configs/stage1.yaml --set optim.lr=1e-4"
        fi
        [[ $dry_run == 1 || -f $1 ]] || l2c_die "config file not found: $1 (relative to $PWD)"
        args=(--config "$1" "${@:2}")
    else
        args=("$@")
    fi

    local entry
    entry=$(l2c_resolve_entry)
    [[ $dry_run == 1 || -f $entry ]] || l2c_die "entry point not found: $entry (set LLM2CLIP_ENTRY or LLM2CLIP_ROOT)"
    local -a py
    read -r -a py <<<"${PYTHON:-python}"
    local -a cmd=("${py[@]}" "$entry" "${args[@]}")

    local launcher=${LLM2CLIP_LAUNCHER:-auto}
    if [[ $launcher == auto ]]; then
        if [[ -n ${SLURM_JOB_ID:-} && -z ${SLURM_STEP_ID:-} ]]; then launcher=srun; else launcher=torchrun; fi
    fi

    l2c_export_env
    case $launcher in
        srun) l2c_run_srun "$dry_run" "${cmd[@]}" ;;
        torchrun) l2c_run_torchrun "$dry_run" "${cmd[@]}" ;;
        python) l2c_run_plain "$dry_run" "${cmd[@]}" ;;
        *) l2c_die "LLM2CLIP_LAUNCHER=$launcher: expected auto, srun, torchrun or python" ;;
    esac
}

l2c_run_plain() {
    local dry_run=$1; shift
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc 2>/dev/null || echo 1)}
    if [[ $dry_run == 1 ]]; then
        echo "launcher=python"
        echo "command: $(l2c_quote "$@")"
        l2c_env_summary
        return 0
    fi
    l2c_log "launcher=python: $(l2c_quote "$@")"
    exec "$@"
}

l2c_gpu_count() {
    local n=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ $n =~ ^[0-9]+$ && $n -ge 1 ]] && echo "$n" || echo 1
}

l2c_run_torchrun() {
    local dry_run=$1; shift
    local nproc=${NPROC_PER_NODE:-$(l2c_gpu_count)}
    [[ $nproc =~ ^[1-9][0-9]*$ ]] || l2c_die "NPROC_PER_NODE=$nproc is not a positive integer"
    local cpus
    cpus=$(nproc 2>/dev/null || echo 1)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / nproc > 0 ? cpus / nproc : 1 ))}
    local -a torchrun
    if [[ -n ${TORCHRUN:-} ]]; then
        read -r -a torchrun <<<"$TORCHRUN"
    else
        torchrun=("$1" -m torch.distributed.run)   # the same interpreter as the tasks
    fi
    local -a full=("${torchrun[@]}" --standalone "--nproc_per_node=$nproc" "${@:2}")
    if [[ $dry_run == 1 ]]; then
        echo "launcher=torchrun nproc_per_node=$nproc (rendezvous: --standalone, torchrun picks MASTER_ADDR/MASTER_PORT)"
        echo "command: $(l2c_quote "${full[@]}")"
        l2c_env_summary
        return 0
    fi
    l2c_log "launcher=torchrun: $(l2c_quote "${full[@]}")"
    exec "${full[@]}"
}

# True when Slurm is ending the job for its time limit (Reason=TimeLimit, also while COMPLETING).
# A checkpoint that finished only after the time limit still deserves a requeue.
l2c_hit_time_limit() {
    scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -q 'Reason=TimeLimit'
}

l2c_run_srun() {
    local dry_run=$1; shift
    [[ -n ${SLURM_JOB_ID:-} ]] || l2c_die "LLM2CLIP_LAUNCHER=srun needs a Slurm allocation (SLURM_JOB_ID unset)"
    local -a nodes
    mapfile -t nodes < <(l2c_hostnames)
    [[ ${#nodes[@]} -ge 1 && -n ${nodes[0]} ]] || l2c_die "could not expand SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST:-}"
    local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#nodes[@]}}}
    local ntasks=${SLURM_NTASKS:-}
    local tpn=${SLURM_NTASKS_PER_NODE:-}
    tpn=${tpn%%(*}; tpn=${tpn%%,*}
    if [[ -z $ntasks ]]; then ntasks=$(( ${tpn:-1} * nnodes )); fi
    if [[ -z $tpn ]]; then tpn=$(( ntasks / nnodes )); fi

    export MASTER_ADDR=${LLM2CLIP_MASTER_ADDR:-${nodes[0]}}
    # Same on every node (computed once here, exported to all tasks), stable across requeues,
    # in 20000-29999: clear of the usual service ports and below the Linux ephemeral range (32768+).
    export MASTER_PORT=${MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    # Stale torchrun variables from the submitting shell must not override SLURM_PROCID.
    unset RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE GROUP_RANK
    # Tasks per node, as torchrun would set it (only when Slurm says it is the same on every node).
    [[ -n ${SLURM_NTASKS_PER_NODE:-} && $tpn =~ ^[0-9]+$ ]] && export LOCAL_WORLD_SIZE=$tpn

    # --kill-on-bad-exit=0: a rank exiting 42 must not get its peers SIGKILLed while they save.
    local -a srun_cmd=(srun --kill-on-bad-exit=0)
    # Slurm 22.05+ srun does not inherit --cpus-per-task from sbatch: pass it on explicitly.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_cmd+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
    if [[ -n ${LLM2CLIP_SRUN_ARGS:-} ]]; then
        local -a extra
        read -r -a extra <<<"$LLM2CLIP_SRUN_ARGS"
        srun_cmd+=("${extra[@]}")
    fi
    # Each task mirrors its Slurm ids into the torchrun variables, logs where it runs and what
    # MASTER_ADDR resolves to *on its node* (the usual multi-node failure: a name that resolves
    # differently, or not at all, on the other nodes), then execs python directly.
    # shellcheck disable=SC2016
    srun_cmd+=(bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS NODE_RANK=$SLURM_NODEID
_l2c_ip=unresolved; command -v getent >/dev/null || _l2c_ip=no-getent
_l2c_a=$(getent ahostsv4 "$MASTER_ADDR" 2>/dev/null | head -n1); _l2c_a=${_l2c_a%% *}
printf "[llm2clip task] rank=%s local_rank=%s local_world_size=%s node_rank=%s host=%s master=%s(%s):%s\n" "$RANK" "$LOCAL_RANK" "${LOCAL_WORLD_SIZE:-?}" "$NODE_RANK" "$(uname -n)" "$MASTER_ADDR" "${_l2c_a:-$_l2c_ip}" "$MASTER_PORT" >&2
exec "$@"' llm2clip-task "$@")

    if [[ $dry_run == 1 ]]; then
        echo "launcher=srun job=$SLURM_JOB_ID nodes=$nnodes tasks_per_node=$tpn world_size=$ntasks master_addr=$MASTER_ADDR master_port=$MASTER_PORT"
        echo "srun: $(l2c_quote "${srun_cmd[@]}")"
        local i j rank
        for ((i = 0; i < ${#nodes[@]} && i < nnodes; i++)); do
            for ((j = 0; j < tpn; j++)); do
                rank=$(( i * tpn + j ))
                echo "task node=${nodes[$i]} RANK=$rank LOCAL_RANK=$j WORLD_SIZE=$ntasks NODE_RANK=$i MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS: $(l2c_quote "$@")"
            done
        done
        l2c_env_summary
        return 0
    fi

    l2c_log "job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$nnodes (${nodes[*]}) world_size=$ntasks master=$MASTER_ADDR:$MASTER_PORT"
    l2c_log "srun: $(l2c_quote "${srun_cmd[@]}")"
    l2c_env_summary >&2

    # srun runs in the background so that this shell can react to signals while it waits: bash
    # runs traps only between commands, and `wait` is interruptible. Signals aimed at the batch
    # shell (`#SBATCH --signal=B:USR1@120`, `scancel --batch/--full`) are forwarded to srun, which
    # forwards them to every task. Signals aimed at the steps (`--signal=USR1@120`, plain
    # `scancel --signal=USR1`) reach the tasks without us.
    local srun_pid rc
    L2C_GOT_TERM=0
    "${srun_cmd[@]}" &
    srun_pid=$!
    # shellcheck disable=SC2064
    trap "l2c_log 'batch shell got SIGUSR1, forwarding to srun'; kill -USR1 $srun_pid 2>/dev/null || true" USR1
    # shellcheck disable=SC2064
    trap "l2c_log 'batch shell got SIGUSR2, forwarding to srun'; kill -USR2 $srun_pid 2>/dev/null || true" USR2
    # shellcheck disable=SC2064
    trap "L2C_GOT_TERM=1; l2c_log 'batch shell got SIGTERM, forwarding to srun'; kill -TERM $srun_pid 2>/dev/null || true" TERM
    while :; do
        wait "$srun_pid"
        rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break   # still alive: wait was interrupted by a trap
    done
    trap - USR1 USR2 TERM
    l2c_log "srun exited with code $rc"

    if [[ $rc -eq $L2C_REQUEUE_EXIT ]]; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${LLM2CLIP_MAX_RESTARTS:-100}
        if [[ ${LLM2CLIP_NO_REQUEUE:-0} == 1 ]]; then
            l2c_log "checkpointed (exit $rc); LLM2CLIP_NO_REQUEUE=1, not requeueing"
        elif [[ $L2C_GOT_TERM == 1 ]] && ! l2c_hit_time_limit; then
            # SIGTERM on the batch shell and no time limit: the job is being cancelled (scancel).
            # Slurm accepts `scontrol requeue` even for a cancelled job, so requeueing here would
            # turn every scancel into a restart.
            l2c_log "checkpointed (exit $rc) while the job was being cancelled: not requeueing; resubmit to resume"
        elif (( restarts >= max )); then
            l2c_log "checkpointed (exit $rc) but the job was already restarted $restarts times (LLM2CLIP_MAX_RESTARTS=$max): not requeueing"
        else
            # Log first: once requeued, Slurm may kill this shell before another line is written.
            l2c_log "checkpointed (exit $rc): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            l2c_log "checkpointed (exit $rc) but \`scontrol requeue $SLURM_JOB_ID\` failed (not a batch job, or submitted with --no-requeue?)"
        fi
    fi
    exit "$rc"
}
