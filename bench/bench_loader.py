"""Stage-2 loader images/s: ours (llm2clip.data.stage2_stream) against a plain webdataset pipeline doing the
same work on the same shards, side by side in one run.

Both: image shards + embedding sidecars joined by key, a sample shuffle buffer of the same size, the caption
field chosen per sample (dense with probability dense_ratio) and only its `.npy` decoded, JPEG decode,
random-resized crop + bicubic resize, pixels as ours emits them (uint8 or normalised float32), batches of
`--batch`, the same number of DataLoader workers. The bare pipeline (`bare_loader`) uses webdataset, PIL
and numpy only (no llm2clip import). Runs are interleaved (ours, bare, ours, ...) and medians reported;
each run is one pass from a fresh loader (worker start-up included) over `--images` images.

    python bench/bench_loader.py            # ~1.5 min on 2 cores; JSON + table

It also reports samples and bytes read by our loader in one epoch over 2 of the shards with 2 ranks x 4
workers (8 streams; every sample once, bytes against the dataset's image + sidecar bytes); the data's
proportions come from --source-size / --width (e.g. `--source-size 64 --width 64` for the test shards').
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["txt", "short_alt", "dense", "dense_alt"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --- the bare pipeline: webdataset + PIL + numpy ---------------------------------------------------
def bare_loader(img_shards: list[str], sidecar_dir: str, batch: int, workers: int, buffer: int, size: int,
                scale: tuple[float, float], dense_ratio: float, uint8: bool, seed: int = 0):
    import webdataset as wds

    dense, orig = ["dense", "dense_alt"], ["txt", "short_alt"]

    def join(samples):
        """Image samples of a shard in order -> with the chosen field's embedding bytes (sidecar by key)."""
        url, side = None, None
        rng = random.Random(seed)
        for s in samples:
            if s["__url__"] != url:
                url = s["__url__"]
                side = iter(wds.tarfile_to_samples()([{"url": os.path.join(sidecar_dir, os.path.basename(url))}]))
            e = next(side)
            while e["__key__"] != s["__key__"]:
                e = next(side)
            pool = [f for f in (dense if rng.random() < dense_ratio else orig) if f"{f}.npy" in e]
            yield {"__key__": s["__key__"], "jpg": s["jpg"], "npy": e[f"{rng.choice(pool)}.npy"]}

    rng = np.random.default_rng(seed)
    mean = np.array(MEAN, np.float32).reshape(3, 1, 1)
    std = np.array(STD, np.float32).reshape(3, 1, 1)

    def decode(s):
        with Image.open(io.BytesIO(s["jpg"])) as im:
            im = im.convert("RGB")
            W, H = im.size
            for _ in range(10):  # torchvision RandomResizedCrop parameters
                area = W * H * rng.uniform(*scale)
                ar = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
                w, h = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
                if 0 < w <= W and 0 < h <= H:
                    top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
                    break
            else:
                top, left, h, w = 0, 0, H, W
            px = np.asarray(im.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h)),
                            dtype=np.uint8).transpose(2, 0, 1)
        if not uint8:
            px = (px.astype(np.float32) / 255.0 - mean) / std
        emb = np.lib.format.read_array(io.BytesIO(s["npy"]), allow_pickle=False)
        return s["__key__"], np.ascontiguousarray(px), emb.astype(np.float32)

    def collate(items):
        return {"keys": [k for k, _, _ in items], "pixels": np.stack([p for _, p, _ in items]),
                "emb": np.stack([e for _, _, e in items])}

    def endless_shards():  # like training (and like ours): the stream never ends, workers keep prefetching
        while True:
            yield from ({"url": u} for u in img_shards)

    ds = wds.DataPipeline(endless_shards, wds.split_by_worker, wds.tarfile_to_samples(), join,
                          wds.shuffle(buffer, initial=buffer), wds.map(decode),
                          wds.batched(batch, collation_fn=collate, partial=False))
    return wds.WebLoader(ds, batch_size=None, num_workers=workers)


# --- ours --------------------------------------------------------------------------------------------
def our_loader(root: Path, batch: int, workers: int, buffer: int, size: int):
    sys.path.insert(0, str(ROOT))
    from llm2clip.config import load_config
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.schema_stage2 import Stage2Config

    cfg = load_config(Stage2Config, None, [f"data.shards={root}/data/train/shard-*.tar",
                                           f"data.sidecar.out_dir={root}/emb", "vision.path=x",
                                           "data.original_fields=[txt, 'json:short_alt']",
                                           f"data.shuffle_buffer={buffer}"])
    ds = Stage2Stream(cfg.data, batch, 0, 0, 1, size, MEAN, STD, False)
    return make_loader(ds, workers), cfg.data


def bytes_per_epoch(root: Path, ranks: int = 2, workers: int = 4) -> dict:
    """Our loader over 2 shards with ranks x workers streams for one epoch: samples and bytes read
    (summed over streams, as in export/data_stats.json) against the dataset's samples and bytes."""
    from llm2clip.config import load_config
    from llm2clip.data.stage2_stream import Stage2Stream, make_loader
    from llm2clip.schema_stage2 import Stage2Config

    shards = sorted((root / "data/train").glob("shard-*.tar"))[:2]
    cfg = load_config(Stage2Config, None, [f"data.shards={root}/data/train/shard-00000{{0..1}}.tar",
                                           f"data.sidecar.out_dir={root}/emb", "vision.path=x",
                                           "data.original_fields=[txt, 'json:short_alt']"])
    per_stream = 400 // (ranks * workers)
    samples = nbytes = 0
    for rank in range(ranks):
        it = iter(make_loader(Stage2Stream(cfg.data, per_stream, 0, rank, ranks, 32, MEAN, STD, False), workers))
        for _ in range(workers):  # one batch = one stream's epoch
            st = next(it)["_stats"]
            samples, nbytes = samples + st["samples_read"], nbytes + st["bytes_read"]
        del it
    total = sum(os.path.getsize(p) for p in shards) + sum(os.path.getsize(root / "emb" / p.name) for p in shards)
    return {"streams": ranks * workers, "samples_read": samples, "samples": 400, "bytes_read": nbytes,
            "dataset_bytes": total, "bytes_ratio": nbytes / total}


def make_data(root: Path, n: int, shard_size: int, image_size: int, width: int) -> None:
    sys.path.insert(0, str(ROOT))
    from llm2clip.data.shards import iter_tar_samples
    from llm2clip.data.sidecar import write_sidecar
    from llm2clip.data.synthetic import generate

    generate(root / "data", n_train=n, n_val=4, seed=0, image_size=image_size, shard_size=shard_size, cls_per_class=1)
    rng = np.random.default_rng(0)
    for sh in sorted((root / "data/train").glob("shard-*.tar")):
        samples = [(s["__key__"], {f: rng.standard_normal(width).astype(np.float16) for f in FIELDS})
                   for s in iter_tar_samples(str(sh), want={"txt"})]
        write_sidecar(root / "emb" / sh.name, samples, FIELDS, width, "float16", "bench")


def _cpu() -> float:
    """CPU seconds of this process + its finished children (the loader workers, joined when the iterator dies)."""
    import resource
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(loader, n_batches: int) -> tuple[float, object, float]:
    """(wall seconds, first batch, CPU seconds over all processes) of one fresh pass."""
    c0, t0 = _cpu(), time.perf_counter()
    it = iter(loader)
    first = None
    for _ in range(n_batches):
        b = next(it)
        first = first if first is not None else b
    dt = time.perf_counter() - t0
    del it  # joins the workers, so their CPU time is counted
    return dt, first, _cpu() - c0


def matched_buffer(buffer: int, samples: int, workers: int) -> int:
    """The bare loader's shuffle buffer: ours never lets a shuffle block span an epoch of its stream, so
    webdataset's buffer gets the same fill (a worker's share of the data), else it reads several epochs
    before its first sample."""
    return min(buffer, samples // max(workers, 1))


def loader_pair(root: Path, batch: int, workers: int, buffer: int, image_size: int, samples: int):
    """(ours, bare, info): our loader and the bare pipeline over the shards and sidecars under `root` with the
    same settings (the bare one takes crop scale and dense ratio from our config, the pixel dtype from our
    first batch); each has produced one batch already (shapes checked equal)."""
    shards = sorted(str(p) for p in (root / "data/train").glob("shard-*.tar"))
    ours, cfg = our_loader(root, batch, workers, buffer, image_size)
    _, probe, _ = timed(ours, 1)
    uint8 = probe["pixels"].dtype.is_floating_point is False
    bare_buffer = matched_buffer(buffer, samples, workers)
    bare = bare_loader(shards, str(root / "emb"), batch, workers, bare_buffer, image_size,
                       tuple(cfg.crop_scale), cfg.dense_ratio, uint8)
    _, bprobe, _ = timed(bare, 1)
    assert tuple(bprobe["pixels"].shape) == tuple(probe["pixels"].shape), (bprobe["pixels"].shape, probe["pixels"].shape)
    return ours, bare, {"pixels": "uint8" if uint8 else "float32", "bare_buffer": bare_buffer,
                        "dense_ratio": cfg.dense_ratio, "crop_scale": list(cfg.crop_scale)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=768, help="images per run (one epoch of the data: 800)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--buffer", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224, help="crop size")
    ap.add_argument("--source-size", type=int, default=256, help="size of the generated JPEGs")
    ap.add_argument("--width", type=int, default=1024, help="embedding width (fp16 sidecars)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    make_data(root, 800, 200, args.source_size, args.width)
    n_batches = args.images // args.batch
    ours, bare, info = loader_pair(root, args.batch, args.workers, args.buffer, args.image_size, 800)
    uint8 = info["pixels"] == "uint8"
    times: dict[str, list[float]] = {"ours": [], "bare": []}
    cpu: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(args.repeats):
        for name, loader in (("ours", ours), ("bare", bare)):
            dt, _, c = timed(loader, n_batches)
            times[name].append(dt)
            cpu[name].append(c)
    n = n_batches * args.batch
    # wall images/s is what training sees; CPU ms/image (all processes) is steadier on a shared machine
    res = {name: {"images_per_s": n / statistics.median(t), "cpu_ms_per_image": 1e3 * statistics.median(cpu[name]) / n,
                  "runs_s": [round(x, 3) for x in t]} for name, t in times.items()}
    out = {"bench": "loader", "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "workers": args.workers, "batch": args.batch, "images_per_run": n, "buffer": args.buffer,
           "image_size": args.image_size, "source_size": args.source_size, "width": args.width,
           "pixels": "uint8" if uint8 else "float32", **res,
           "ratio_ours_over_bare": res["ours"]["images_per_s"] / res["bare"]["images_per_s"],
           "cpu_ratio_bare_over_ours": res["bare"]["cpu_ms_per_image"] / res["ours"]["cpu_ms_per_image"],
           "read_once": bytes_per_epoch(root)}
    print(json.dumps(out, indent=1))
    print(f"\n| loader | images/s (median of {args.repeats}) | CPU ms/image |\n|---|---|---|")
    for name in ("ours", "bare"):
        print(f"| {name} | {res[name]['images_per_s']:.0f} | {res[name]['cpu_ms_per_image']:.2f} |")
    print(f"| ours vs bare | {out['ratio_ours_over_bare']:.2f}x | {out['cpu_ratio_bare_over_ours']:.2f}x |")
    r = out["read_once"]
    print(f"\nread once: 2 shards over {r['streams']} streams, one epoch: {r['samples_read']} of {r['samples']} samples, "
          f"{r['bytes_read']:,} of {r['dataset_bytes']:,} bytes ({r['bytes_ratio']:.2f}x)")
    return out


if __name__ == "__main__":
    main()
