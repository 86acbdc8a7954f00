"""Full verification of an embed job's sidecars: `python tools/embed_captions.py --verify --config CFG`.

Stage 2 starts from manifests and sizes only (data/sidecar.py scan_sidecars); reading and hashing
every sidecar tar is this explicit command instead. Under torchrun / srun each rank verifies every
world-th shard of the job (sha256 and key count against the manifest, recorded size, the image shard
still the size that was embedded), the results are gathered, and rank 0 logs a report naming every
bad shard and writes it to `<output.out_dir>/verify_report.json` when out_dir is set. Returns the
report on every rank; `ok` is False when any shard is missing, corrupt or from another layout, or
when the manifests come from more than one encoder.
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from llm2clip import distributed as D
from llm2clip.config import ConfigError, atomic_write_text
from llm2clip.data import sidecar as S
from llm2clip.data.io import is_url
from llm2clip.schema_embed import EmbedConfig, field_name
from llm2clip.tasks.embed import ShardJob, plan_jobs

log = logging.getLogger("llm2clip")


def verify_one(job: ShardJob, names: list[str], dtype: str) -> dict[str, Any]:
    """{"image", "sidecar", "problem": str | None, "fingerprint", "bytes"} for one shard."""
    out = {"image": job.image, "sidecar": job.sidecar, "problem": None, "fingerprint": None, "bytes": 0}
    m = S.read_manifest(job.sidecar)
    if m is None:
        out["problem"] = "missing: no valid manifest (never embedded, unfinished or killed)"
        return out
    out["fingerprint"], out["bytes"] = m.get("fingerprint"), int(m.get("bytes") or 0)
    problem = S.manifest_mismatch(m, None, names, dtype, exact_fields=True) or S.validate_sidecar(job.sidecar, m, verify=True)
    if problem is None and not is_url(job.image) and m.get("image_shard_bytes") not in (None, os.path.getsize(job.image)):
        problem = "the image shard changed size since it was embedded"
    out["problem"] = problem
    return out


def run_verify(cfg: EmbedConfig, threads: int | None = None) -> dict[str, Any]:
    """Verify this rank's share of the job's sidecars, gather, report (see the module docstring)."""
    from llm2clip.logger import setup_logging

    setup_logging()
    t0 = time.perf_counter()
    D.init_distributed()
    rank, world = D.get_rank(), D.get_world_size()
    plan = None
    if rank == 0:
        try:
            plan = (plan_jobs(cfg), None)
        except Exception as e:  # noqa: BLE001 - every rank must hear about it, not wait in the broadcast
            plan = ([], f"{type(e).__name__}: {e}")
    jobs, err = D.broadcast_object(plan)
    if err:
        raise ConfigError(err)
    names = [field_name(f) for f in cfg.data.fields]
    mine = jobs[rank::world]
    # sha256 releases the GIL on large blocks: a few threads per rank use the cores this rank has
    n_threads = threads or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    with ThreadPoolExecutor(n_threads) as ex:
        results = list(ex.map(lambda j: verify_one(j, names, cfg.output.dtype), mine))
    seconds = time.perf_counter() - t0
    parts = D.all_gather_object({"results": results, "seconds": seconds})
    rows = [r for p in parts for r in p["results"]]
    bad = sorted((r for r in rows if r["problem"]), key=lambda r: r["image"])
    fps: dict[str, int] = {}
    for r in rows:
        if r["fingerprint"] is not None:
            fps[r["fingerprint"]] = fps.get(r["fingerprint"], 0) + 1
    gb = sum(r["bytes"] for r in rows) / 1e9
    report = {"ok": not bad and len(fps) <= 1, "shards": len(rows), "bad": len(bad),
              "bad_shards": [{"image": r["image"], "sidecar": r["sidecar"], "problem": r["problem"]} for r in bad],
              "fingerprints": fps, "gigabytes": round(gb, 6), "world_size": world,
              "seconds_per_rank": [round(p["seconds"], 3) for p in parts]}
    if rank == 0:
        for r in bad[:50]:
            log.error(f"verify: {r['sidecar']} (for {r['image']}): {r['problem']}")
        if len(bad) > 50:
            log.error(f"verify: ... and {len(bad) - 50} more bad shard(s), all listed in the report")
        if len(fps) > 1:
            log.error(f"verify: the manifests come from {len(fps)} encoders: {fps}")
        log.info(f"verify: {len(rows)} sidecar(s), {gb:.3f} GB, {len(bad)} bad, {len(fps)} encoder(s), "
                 f"{max(report['seconds_per_rank'] or [0]):.1f}s on {world} rank(s): "
                 f"{'OK' if report['ok'] else 'FAILED (re-run the embed step to rewrite the bad shards)'}")
        if cfg.output.out_dir and not is_url(cfg.output.out_dir):
            atomic_write_text(Path(cfg.output.out_dir) / "verify_report.json", json.dumps(report, indent=1))
    return report
