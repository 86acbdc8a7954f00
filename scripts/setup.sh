#!/usr/bin/env bash
# Install llm2clip's pinned dependencies into the current Python (use a venv if you like:
# `python -m venv .venv && . .venv/bin/activate` first). Idempotent; ~1 min on a fresh machine.
# torch is pinned through constraints.txt in the same command, so pip never pulls a CUDA build.
# Needs no root. `--with-slurm` (scripts/test.sh passes it) also installs Debian's slurm-wlm for the
# real-Slurm tests, as root only; the quickstart and training never need Slurm.
set -euo pipefail
WITH_SLURM=0
[ "${1:-}" = "--with-slurm" ] && WITH_SLURM=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch, transformers, peft, deepspeed, webdataset, tensorboard, safetensors, yaml, pytest, braceexpand" >/dev/null 2>&1 \
   || ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, re, sys
pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s#]+)", open("requirements.txt").read(), re.M))
bad = [n for n, v in pins.items() if md.version(n).split("+")[0] != v]
sys.exit(1 if bad else 0)
PYEOF
then
  echo "[setup] installing pinned requirements (requirements.txt + constraints.txt)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements.txt -c constraints.txt
fi
# Real Slurm for the launcher tests (Debian's slurm-wlm; needs root). Skipped when present.
if [ "$WITH_SLURM" = 1 ] && [ "${LLM2CLIP_SKIP_SLURM:-0}" != 1 ] && ! command -v slurmctld >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing slurm-wlm (for the real-Slurm tests)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm >/dev/null
  else
    echo "[setup] slurm-wlm not installed and not root: the real-Slurm tests will be skipped"
  fi
fi
