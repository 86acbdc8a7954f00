"""Host bytes of one stage-2 pixel batch: the uint8 tensor our loader ships now vs the float32 tensor the
workers shipped before, measured on actual batches of the stage-2 loader over generated shards.

The "before" tensor is computed from the same batch with `transforms.normalize` in float32, which is bit
for bit what the workers used to produce (tests/test_transforms.py, tests/test_stage2.py). Also printed:
the shared memory one rank's loader holds in flight (batch bytes x workers x prefetch_factor 2).

    python bench/bench_host_bytes.py                         # 512 x 3 x 336 x 336, ~1-2 min on 2 cores
    python bench/bench_host_bytes.py --batch 64 --size 224
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--workers", type=int, default=8, help="loader workers per rank, for the in-flight figure")
    a = ap.parse_args()
    import numpy as np
    import torch
    from llm2clip.config import load_config
    from llm2clip.data.shards import iter_tar_samples
    from llm2clip.data.sidecar import write_sidecar
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.data.synthetic import generate
    from llm2clip.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, normalize
    from llm2clip.schema_stage2 import Stage2Config

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "data", n_train=a.batch, n_val=0, seed=0, image_size=a.size, shard_size=a.batch,
                 cls_per_class=0)
        shard = root / "data/train/shard-000000.tar"
        rng = np.random.default_rng(0)
        keys = [s["__key__"] for s in iter_tar_samples(str(shard), want={"txt"})]
        write_sidecar(root / "emb/shard-000000.tar", [(k, {"txt": rng.standard_normal(64).astype(np.float16)})
                                                       for k in keys], ["txt"], 64, "float16", "fp")
        cfg = load_config(Stage2Config, None, [f"data.shards={shard}", f"data.sidecar.out_dir={root}/emb",
                                                "vision.path=x", "data.original_fields=[txt]",
                                                "data.dense_fields=[txt]"])
        ds = Stage2Stream(cfg.data, a.batch, 0, 0, 1, a.size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, False)
        t = time.perf_counter()
        batch = next(iter(make_loader(ds, 0)))
        load_s = time.perf_counter() - t
    px = batch["pixels"]
    t = time.perf_counter()
    before = normalize(px, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)  # the float32 batch the workers used to ship
    norm_s = time.perf_counter() - t
    now_b, before_b = px.nelement() * px.element_size(), before.nelement() * before.element_size()
    res = {"machine": f"{platform.node()} {os.cpu_count()} cores, torch {torch.__version__}",
           "shape": list(px.shape), "dtype_now": str(px.dtype), "dtype_before": str(before.dtype),
           "bytes_now": now_b, "bytes_before": before_b, "ratio": round(before_b / now_b, 2),
           "in_flight_per_rank_now": now_b * a.workers * 2, "in_flight_per_rank_before": before_b * a.workers * 2,
           "workers": a.workers, "first_batch_s": round(load_s, 2), "normalize_on_cpu_s": round(norm_s, 3)}
    print(json.dumps(res, indent=1))
    print(f"\npixels {tuple(px.shape)}: before float32 {before_b / 2**20:.0f} MiB ({before_b / 1e6:.0f} MB), "
          f"now uint8 {now_b / 2**20:.0f} MiB ({now_b / 1e6:.0f} MB), {before_b / now_b:.1f}x less; in flight per rank "
          f"({a.workers} workers x prefetch 2): {before_b * a.workers * 2 / 2**30:.1f} GiB -> "
          f"{now_b * a.workers * 2 / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
