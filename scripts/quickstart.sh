#!/usr/bin/env bash
# Fresh machine -> the whole pipeline on the embedded default (tiny models + generated data):
# synthetic data, stage 1 (CRA before/after), embed, stage 2, zero-shot eval, one final table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" tools/run_pipeline.py "$@"
