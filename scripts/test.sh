#!/usr/bin/env bash
# Fresh machine -> the test suite (CPU; multi-process tests under torchrun/gloo; real Slurm when installable).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python3}" -m pytest tests "$@"
