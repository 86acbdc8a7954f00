"""Stage-2 start-up against the shard count: process start -> first batch, with N image shards and their
sidecars (manifests + index.json), and what the old start-up check (sha256 of every sidecar tar) costs per GB.

For each N (default 100, 1000, 10000) a fresh `python` process (timed from just before it is spawned)
imports llm2clip, runs the stage-2 task's start-up exactly as training does — `Stage2Task(cfg)`
(the sidecar preflight on rank 0 + the shard sizes + the stream check), `task.module()` (a tiny CLIP
tower) and `task.batches(None)` up to the first micro-batch — and reports each phase. Twice per N:
with the folder's index.json (the preflight stats the files) and without it (it reads every manifest).
Side by side: the old preflight, `verify=True`, which read and hashed every sidecar tar: measured here
in s/GB on real sidecars (page cache warm, so this is the CPU floor; a cold disk or a network
filesystem is slower) and extrapolated to the bench's sidecar bytes and to CC3M+CC12M (355 GB).

    python bench/bench_startup.py                     # ~5 min on 2 cores, most of it writing 10,000 shards
    python bench/bench_startup.py --shards 100 1000   # quicker
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _jpg(seed: int, size: int = 32) -> bytes:
    import numpy as np
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    b = io.BytesIO()
    Image.fromarray(a).save(b, "JPEG", quality=90)
    return b.getvalue()


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def build(root: Path, n_shards: int, per_shard: int, width: int) -> None:
    """n_shards image shards of per_shard tiny samples + fp16 sidecars, manifests and index.json."""
    import numpy as np
    from llm2clip.data.sidecar import write_index, write_sidecar

    img_dir, emb_dir = root / "img", root / "emb"
    img_dir.mkdir(parents=True)
    jpgs = [_jpg(i) for i in range(16)]
    rng = np.random.default_rng(0)
    manifests = []
    for s in range(n_shards):
        keys = [f"{s:06d}{i:04d}" for i in range(per_shard)]
        with tarfile.open(img_dir / f"shard-{s:06d}.tar", "w") as tf:
            for i, k in enumerate(keys):
                _member(tf, f"{k}.jpg", jpgs[(s + i) % len(jpgs)])
                _member(tf, f"{k}.txt", f"caption {k}".encode())
        samples = [(k, {"txt": rng.standard_normal(width).astype(np.float16)}) for k in keys]
        manifests.append(write_sidecar(emb_dir / f"shard-{s:06d}.tar", samples, ["txt"], width, "float16", "fp-bench"))
    write_index(emb_dir / "index.json", manifests)


def child(root: str, n: int, t_spawn: float) -> None:
    """One start-up, timed from t_spawn (the parent's clock just before spawning this process)."""
    t0 = time.time()
    from llm2clip.config import load_config
    from llm2clip.schema_stage2 import Stage2Config
    from llm2clip.tasks.stage2 import Stage2Task

    t1 = time.time()
    cfg = load_config(Stage2Config, None, [
        f"data.shards={root}/img/shard-{{000000..{n - 1:06d}}}.tar", f"data.sidecar.out_dir={root}/emb",
        f"vision.path={root}/clip", "data.original_fields=[txt]", "data.dense_fields=[txt]", "data.num_workers=0",
        "data.val_shards=", "train.micro_batch_size=8", f"run.output_dir={root}/run"])
    task = Stage2Task(cfg)  # rank 0's sidecar preflight, shard sizes, stream check
    t2 = time.time()
    task.module()
    t3 = time.time()
    batch = next(iter(task.batches(None)))
    t4 = time.time()
    assert batch["pixels"].shape[0] == 8
    from llm2clip.tasks.stage2 import preflight_sidecars
    t5 = time.time()
    preflight_sidecars(cfg)  # again, alone: the preflight's share of task_init
    t6 = time.time()
    print(json.dumps({"spawn_to_main_s": t0 - t_spawn, "imports_s": t1 - t0, "task_init_s": t2 - t1,
                      "model_s": t3 - t2, "first_batch_s": t4 - t3, "total_s": t4 - t_spawn,
                      "preflight_alone_s": t6 - t5}))


def startup(root: Path, n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LLM2CLIP_HASH_CACHE": "off"}
    t = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", str(root), str(n), repr(t)], env=env,
                       capture_output=True, text=True, timeout=1800)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def old_verify(path: Path) -> None:
    """The start-up check as it was: sha256 of the whole tar, then a second pass counting its keys."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    with tarfile.open(path, "r:") as tf:
        for _ in tf:
            pass


def verify_cost(root: Path, total_mb: int) -> dict:
    """s/GB of the old verify=True check and of today's `--verify` (one pass), on real sidecars."""
    import numpy as np
    from llm2clip.data.sidecar import validate_sidecar, write_sidecar

    d = root / "big"
    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(1)
    width, per = 4096, 512  # 8 KiB fp16 rows: ~4 MiB per sidecar, like a real 4096-wide LLM's
    n = max(1, total_mb // 4)
    paths = []
    for s in range(n):
        samples = [(f"{s:04d}{i:05d}", {"dense": rng.standard_normal(width).astype(np.float16)}) for i in range(per)]
        write_sidecar(d / f"s{s:04d}.tar", samples, ["dense"], width, "float16", "fp")
        paths.append(d / f"s{s:04d}.tar")
    gb = sum(p.stat().st_size for p in paths) / 1e9
    for p in paths:  # warm the page cache for both
        p.read_bytes()
    out = {"gigabytes": round(gb, 3)}
    for name, fn in (("old_verify_true", old_verify), ("verify_cmd_one_pass", lambda p: validate_sidecar(p))):
        t = time.perf_counter()
        for p in paths:
            fn(p)
        out[f"{name}_s_per_gb"] = round((time.perf_counter() - t) / gb, 3)
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--per-shard", type=int, default=4, help="samples per image shard")
    ap.add_argument("--repeat", type=int, default=3, help="start-ups per shard count and mode (medians)")
    ap.add_argument("--width", type=int, default=64, help="embedding width of the bench sidecars")
    ap.add_argument("--verify-mb", type=int, default=256, help="MB of real 4096-wide sidecars to time hashing on")
    ap.add_argument("--keep", default="", help="build the data here and keep it for the next run (default: a temp dir)")
    a = ap.parse_args()
    from llm2clip.data.synthetic import generate
    from llm2clip.testing.tiny_models import make_tiny_clip

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep or tmp)
        t = time.time()
        if not (root / "emb" / f"shard-{max(a.shards) - 1:06d}.manifest.json").is_file():  # --keep: reuse
            build(root, max(a.shards), a.per_shard, a.width)
        build_s = time.time() - t
        if not (root / "clip").is_dir():
            generate(root / "tok", n_train=1, n_val=0, seed=0, image_size=32, shard_size=1, cls_per_class=0)
            make_tiny_clip(root / "clip", root / "tok" / "tokenizer", image_size=32)
        sidecar_gb = sum(p.stat().st_size for p in (root / "emb").glob("*.tar")) / 1e9
        rows = []
        for n in a.shards:  # interleaved repeats, medians per phase (the box is shared and noisy)
            runs: dict[str, list[dict]] = {"with_index": [], "manifests_only": []}
            for _ in range(a.repeat):
                runs["with_index"].append(startup(root, n))
                os.replace(root / "emb/index.json", root / "emb/index.off")
                try:
                    runs["manifests_only"].append(startup(root, n))
                finally:
                    os.replace(root / "emb/index.off", root / "emb/index.json")
            rows.append({"shards": n, **{mode: {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
                                         for mode, rs in runs.items()}})
        cost = verify_cost(root, a.verify_mb)
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores, python {platform.python_version()}",
           "per_shard": a.per_shard, "width": a.width, "build_s": round(build_s, 1), "rows": rows, "verify": cost,
           "bench_sidecar_gb_at_max": round(sidecar_gb, 4)}
    print(json.dumps(res, indent=1))
    print(f"\n{'shards':>7} | {'start->1st batch':>16} | {'task init':>9} | {'preflight':>9} || manifests only: "
          f"{'start->1st batch':>16} | {'task init':>9} | {'preflight':>9}")
    for r in rows:
        w, m = r["with_index"], r["manifests_only"]
        print(f"{r['shards']:>7} | {w['total_s']:>15.2f}s | {w['task_init_s']:>8.2f}s | {w['preflight_alone_s']:>8.2f}s || "
              f"{'':>15} {m['total_s']:>15.2f}s | {m['task_init_s']:>8.2f}s | {m['preflight_alone_s']:>8.2f}s")
    s_gb = cost["old_verify_true_s_per_gb"]
    print(f"\nold start-up check (verify=True): {s_gb:.2f} s/GB (warm cache); --verify (one pass): "
          f"{cost['verify_cmd_one_pass_s_per_gb']:.2f} s/GB. At 355 GB (CC3M+CC12M sidecars): "
          f"{s_gb * 355 / 60:.0f} min per start, from the page cache; at 16 TB: {s_gb * 16000 / 3600:.1f} h.")


if __name__ == "__main__":
    main()
