#!/bin/bash
#SBATCH --job-name=llm2clip-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# Stage 1: contrastive fine-tuning of the LLM text encoder on caption pairs.
#   sbatch slurm/stage1.sh configs/stage1.yaml [--set key=value ...]    # cluster, from the repo root (mkdir -p logs first)
#   bash slurm/stage1.sh configs/stage1.yaml [--set key=value ...]      # workstation: torchrun, one process per GPU
# Any #SBATCH line can be overridden on the sbatch command line (--nodes=4 --time=4:00:00 ...).
# Launcher options and environment variables: docs/SLURM.md.
set -uo pipefail

# Find the repo. sbatch runs a copy of this file from its spool directory, so next to $0 is
# not the repo: then use the path the job was submitted with, then the submit directory.
_l2c_root() {
    local d cmd=""
    if [[ -n ${LLM2CLIP_ROOT:-} ]]; then
        [[ -f $LLM2CLIP_ROOT/slurm/_common.sh ]] && { (cd "$LLM2CLIP_ROOT" && pwd); return; }
        echo "llm2clip: LLM2CLIP_ROOT=$LLM2CLIP_ROOT has no slurm/_common.sh" >&2
        return 1
    fi
    [[ -n ${SLURM_JOB_ID:-} ]] &&
        cmd=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    for d in "$(dirname "${BASH_SOURCE[0]}")/.." "${cmd:+$(dirname "$cmd")/..}" "${SLURM_SUBMIT_DIR:-}"; do
        [[ -n $d && -f $d/slurm/_common.sh ]] && { (cd "$d" && pwd); return; }
    done
    echo "llm2clip: cannot find the repo (slurm/_common.sh); set LLM2CLIP_ROOT=/path/to/llm2clip" >&2
    return 1
}
LLM2CLIP_ROOT=$(_l2c_root) || exit 2
export LLM2CLIP_ROOT
L2C_SCRIPT_NAME=slurm/stage1.sh
# shellcheck source=slurm/_common.sh
source "$LLM2CLIP_ROOT/slurm/_common.sh"
l2c_main tools/train_stage1.py config "$@"
