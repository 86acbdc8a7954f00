#!/usr/bin/env bash
# Fresh machine -> the whole pipeline on the embedded default (tiny models + generated data):
# synthetic data, stage 1 (CRA before/after), embed, stage 2, a CLIP baseline trained with its own text
# tower, eval, one final table (with where the TensorBoard logs and exported models are).
# Needs no root and no Slurm; each stage shows a progress bar with ETA; logs in runs/tiny/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" tools/run_pipeline.py "$@"
