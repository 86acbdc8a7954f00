"""Shared test utilities: tiny world (synthetic data + tiny models) and torchrun launching."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cmd(args: list[str], env_extra: dict | None = None, timeout: int = 600, check: bool = True,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "LLM2CLIP_HASH_CACHE": "off", **(env_extra or {})}
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(args)}\n--- stdout\n{p.stdout[-6000:]}"
                             f"\n--- stderr\n{p.stderr[-6000:]}")
    return p


def torchrun(script: str, args: list[str], nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    script, *args], **kw)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
