"""Shards written the way img2dataset (1.47, `--output_format webdataset`) writes them, from synthetic samples.

Per shard NNNNN: `NNNNN.tar` holding the successful downloads only, in completion order (thread pool: keys
out of order), each as `<key>.jpg` + `<key>.txt` (the caption column) + `<key>.json` (url, key, status,
error_message, width, height, original_width, original_height, exif, sha256, caption, plus
`--save_additional_columns`); `NNNNN_stats.json` (count, successes, failed_to_download, ...); and
`NNNNN.parquet` with one row per URL, failures included. Keys are `{shard:05d}{row:04d}` over the input
rows, so failed rows leave gaps. The .parquet is a placeholder holding the same rows as JSON between parquet
magic bytes (pyarrow is not installed here): nothing in llm2clip opens it, what matters is that it sits
beside the tar.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 1_700_000_000
    tf.addfile(ti, io.BytesIO(data))


def write_img2dataset_shards(samples: list[dict], out_dir: Path, layout: list[tuple[int, int]], seed: int = 0,
                             additional_columns: tuple[str, ...] = ("dense",)) -> list[Path]:
    """samples: dicts with "jpg" (bytes), "txt" (caption) and "json" (other captions as a dict), consumed in
    order; layout: per shard (input rows, failed rows). Returns the tar paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    src = iter(samples)
    tars = []
    for shard_id, (n_rows, n_failed) in enumerate(layout):
        failed = set(rng.sample(range(n_rows), n_failed))
        rows, ok = [], []
        for i in range(n_rows):
            key = f"{shard_id:05d}{i:04d}"
            url = f"http://127.0.0.1:8000/img/{shard_id}/{i}.jpg"
            if i in failed:
                rows.append({"url": url, "key": key, "status": "failed_to_download",
                             "error_message": "HTTP Error 404: Not Found", "caption": None})
                continue
            s = next(src)
            cap = s["txt"]
            meta = {"url": url, "key": key, "status": "success", "error_message": None, "width": 64, "height": 64,
                    "original_width": 64, "original_height": 64, "exif": "{}",
                    "sha256": hashlib.sha256(s["jpg"]).hexdigest(), "caption": cap,
                    **{c: s["json"].get(c) for c in additional_columns}}
            rows.append(meta)
            ok.append((key, s["jpg"], cap, meta))
        rng.shuffle(ok)  # download threads finish in any order
        tar = out_dir / f"{shard_id:05d}.tar"
        with tarfile.open(tar, "w") as tf:
            for key, jpg, cap, meta in ok:
                _add(tf, f"{key}.jpg", jpg)
                _add(tf, f"{key}.txt", cap.encode())
                _add(tf, f"{key}.json", json.dumps(meta, indent=4).encode())
        stats = {"count": n_rows, "successes": len(ok), "failed_to_download": n_failed, "failed_to_resize": 0,
                 "duration": 1.0, "bytes_downloaded": sum(len(j) for _, j, _, _ in ok), "start_time": 0.0,
                 "end_time": 1.0, "status_dict": {"success": len(ok), **({"HTTP Error 404: Not Found": n_failed}
                                                                          if n_failed else {})}}
        (out_dir / f"{shard_id:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        (out_dir / f"{shard_id:05d}.parquet").write_bytes(b"PAR1" + json.dumps(rows).encode() + b"PAR1")
        tars.append(tar)
    return tars


def synthetic_samples(shard_glob: str, n: int) -> list[dict]:
    """The first n samples of llm2clip's synthetic shards as {"jpg", "txt", "json"}."""
    from llm2clip.data.shards import expand_shards, iter_tar_samples

    out = []
    for shard in expand_shards(shard_glob):
        for s in iter_tar_samples(shard):
            out.append({"jpg": s["jpg"], "txt": s["txt"].decode(), "json": json.loads(s["json"])})
            if len(out) == n:
                return out
    raise ValueError(f"{shard_glob}: fewer than {n} samples")
