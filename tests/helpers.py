"""Shared test utilities: tiny world (synthetic data + tiny models) and torchrun launching."""
from __future__ import annotations

import io
import json
import tarfile
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


def write_shard(path, samples):
    """A plain tar shard; samples: list of (key, {ext: bytes|str}) in member order."""
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                data = data.encode() if isinstance(data, str) else data
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def caption_sample(i, dense="a dense caption", txt=None):
    return (f"s{i:04d}", {"txt": txt if txt is not None else f"caption {i}",
                          "json": json.dumps({"dense": dense, "short_alt": f"alt {i}"})})
