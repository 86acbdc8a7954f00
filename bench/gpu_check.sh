#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried wheels, run bench/gpu_check.py, keep its log.
#
#   bash bench/build_gpu_wheels.sh        # here, once (needs PyPI): .whl/ (git-ignored)
#   device tool: command "bash bench/gpu_check.sh", carry [".whl"], timeout_s 600
#
# The machine's image has torch/transformers/peft/timm but no deepspeed, webdataset or braceexpand and
# no network: the wheels go to a private --target folder put first on PYTHONPATH (nothing system-wide
# changes). Results land in $OUT (the device tool brings that folder back), else runs/gpu_check/.
# Extra arguments go to gpu_check.py (e.g. --only stage1,embed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-runs/gpu_check}"
mkdir -p "$OUT_DIR"
SITE=/tmp/gpu_check_site
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || echo "[gpu_check.sh] wheel install failed: sections needing deepspeed will report the ImportError"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "[gpu_check.sh] no .whl/ here (run bench/build_gpu_wheels.sh and carry .whl): using what is installed"
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>/dev/null || true
# gpu_check.py keeps its own deadline (450 s on a GPU); this is the backstop below the tool's 600 s
timeout -k 10 540 python3 bench/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
