"""Stage-2 batches: image shards joined to their embedding sidecars, exactly resumable mid-epoch.

The data is split into S = world x workers logical streams; `llm2clip.data.streams` says which
samples each stream owns (whole shards, or sample ranges of shards when there are fewer shards than
streams: every sample is read once per epoch) and reads them through a seeded block shuffle over
several open shards (`data.shuffle_buffer` samples). Each sample's dataset, caption field and crop
come from RNGs keyed by (seed, stream, counter) or (seed, epoch, key); the field is chosen as the
sample is read and only that embedding member is read and decoded. A stream's position is therefore
a few integers per dataset, carried back with every batch together with its counters (skips per
reason, samples and bytes read). PyTorch's
DataLoader returns batches round-robin over workers, so after resuming at batch b the loader's
worker w plays logical stream (w + b) mod workers: the sequence of batches continues exactly as
without the interruption. The stream states belong to one topology (world x workers); `check_topology`
refuses another one. Streams are endless (epochs roll over per stream); steps, not epochs, bound
training.
"""
from __future__ import annotations

import io
import logging
import time
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from llm2clip.data.rng import keyed_rng
from llm2clip.data.shards import (IMAGE_EXTS, ReadStats, expand_shards, get_caption, image_member, iter_tar_samples,
                                  shard_size)
from llm2clip.data.join import JoinStats, iter_joined
from llm2clip.data.sidecar import decode_npy, read_manifest, sidecar_path_for
from llm2clip.data.streams import ShuffledReader, TopologyError, Unit, assign_units, check_topology, unit_count  # noqa: F401
from llm2clip.data.transforms import train_transform
from llm2clip.schema_embed import field_name
from llm2clip.schema_stage2 import Stage2DataConfig

log = logging.getLogger("llm2clip")


def dataset_shards(spec: str) -> list[list[str]]:
    """'a/*.tar::b/{0..9}.tar' -> [[a shards], [b shards]]."""
    return [expand_shards(part) for part in spec.split("::") if part.strip()]


def dataset_weights(datasets: list[list[str]], weights: list[float],
                    sizes: list[list[int | None]] | None = None) -> list[float]:
    """Sampling weight per dataset: data.weights, else its sample count (`sizes` from `shard_sizes`, read
    here when not given; a shard without a count counts 1)."""
    if weights:
        if len(weights) != len(datasets):
            raise ValueError(f"data.weights has {len(weights)} values for {len(datasets)} datasets ('::'-separated)")
        return list(weights)
    sizes = sizes if sizes is not None else [[shard_size(s) for s in shards] for shards in datasets]
    return [float(sum(c if c is not None else 1 for c in counts)) for counts in sizes]


def shard_sizes(shards: list[str], sidecar_cfg: Any = None) -> list[int | None]:
    """Sample count per image shard: the sidecar manifest's `image_samples` (offline mode), else
    `shard_size` (img2dataset `_stats.json` / `sizes.json`), else None."""
    out: list[int | None] = []
    for sh in shards:
        n = None
        if sidecar_cfg is not None:
            m = read_manifest(sidecar_path_for(sh, sidecar_cfg))
            n = m.get("image_samples") if m else None
        out.append(int(n) if n is not None else shard_size(sh))
    return out


def stream_count(world: int, workers: int) -> int:
    return world * max(workers, 1)


def steps_for_epochs(datasets: list[list[str]], epochs: float, micro_batch: int, world: int, workers: int,
                     grad_accum: int = 1, sizes: list[list[int | None]] | None = None) -> tuple[int, str | None]:
    """Optimizer steps for `epochs` passes over all samples, and a warning when the logical streams
    (world x workers, see the module docstring) hold unequal sample counts: then streams reach their
    epoch boundaries at different steps and "epochs" is approximate."""
    from math import ceil

    S = stream_count(world, workers)
    per_stream = [0] * S
    for d, shards in enumerate(datasets):
        sz = sizes[d] if sizes is not None else [shard_size(s) for s in shards]
        missing = [s for s, n in zip(shards, sz) if n is None]
        if missing:
            raise ValueError(f"data.epochs needs sample counts, but {missing[0]} has no _stats.json / sizes.json "
                             "entry; set train.max_steps instead")
        size_of = dict(zip(shards, sz))
        for s in range(S):
            per_stream[s] += sum(unit_count(u, size_of[u.shard]) for u in assign_units(shards, sz, S, s))
    total = sum(per_stream)
    steps = max(1, ceil(epochs * total / (micro_batch * world * grad_accum)))
    warn = None
    if len(set(per_stream)) > 1:
        warn = (f"data.epochs={epochs}: the {S} data streams (ranks x workers) hold {min(per_stream)} to "
                f"{max(per_stream)} samples, so epochs are approximate; balance the shards over the streams "
                "for exact epochs")
    elif per_stream[0] % micro_batch:
        warn = (f"data.epochs={epochs}: each of the {S} data streams holds {per_stream[0]} samples, which "
                f"train.micro_batch_size={micro_batch} does not divide, so epochs are approximate")
    return steps, warn


_DRAW_STATS = ("corrupt_images", "no_caption", "bad_embedding")  # counted when a sample is drawn
_MAX_NAMED = 5  # skipped samples named in the log per reason and stream


class Stage2Stream(torch.utils.data.IterableDataset):
    """Yields collated micro-batches: {"pixels" [B,3,H,W], "emb" [B,d] or "captions", "keys", "_worker",
    "_state", "_stats"}, and in a DataLoader worker "_loader_cpu": (worker id, that worker process's CPU
    seconds so far, all its threads) for the task's `loader_cpu_s`."""

    def __init__(self, cfg: Stage2DataConfig, micro_batch: int, seed: int, rank: int, world: int,
                 image_size: int, mean, std, online: bool, start: dict | None = None,
                 expected_fingerprint: str | None = None, sizes: list[list[int | None]] | None = None):
        self.cfg, self.micro_batch, self.seed = cfg, micro_batch, seed
        self.rank, self.world, self.online = rank, world, online
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.datasets = dataset_shards(cfg.shards)
        # per-shard sample counts decide every stream's sample ranges; the task passes the ones rank 0 read
        # and broadcast (at 100k shards every rank re-reading every manifest is minutes of metadata I/O);
        # read here only when not given. Workers inherit them.
        self.sizes = sizes if sizes is not None else [shard_sizes(sh, None if online else cfg.sidecar)
                                                      for sh in self.datasets]
        self.weights = dataset_weights(self.datasets, cfg.weights, self.sizes)
        self.fingerprint = expected_fingerprint
        start = start or {}
        self.worker_states: dict[int, dict] = {int(k): v for k, v in start.get("workers", {}).items()}
        self.rotate = int(start.get("batches", 0))
        self.fields = list(dict.fromkeys(cfg.dense_fields + cfg.original_fields))

    # ---- per-worker generator ----------------------------------------------------------------
    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        nw, w = (wi.num_workers, wi.id) if wi else (1, 0)
        logical = (w + self.rotate) % nw
        stream, S = self.rank * nw + logical, stream_count(self.world, nw)
        st = self.worker_states.get(logical, {})
        saved = st.get("datasets", [None] * len(self.datasets))
        readers: list[ShuffledReader] = []
        for i, sh in enumerate(self.datasets):
            def read(unit, start, stats, i=i):  # the field is chosen at read time, in the reader's epoch
                return self._read_unit(unit, start, stats, readers[i].epoch)
            readers.append(ShuffledReader(assign_units(sh, self.sizes[i], S, stream), read, self.seed,
                                          f"ds{i}.s{stream}", self.cfg.shuffle_buffer, saved[i]))
        counter = st.get("counter", 0)
        stats = {k: st.get("stats", {}).get(k, 0) for k in _DRAW_STATS}
        gens = [iter(r) for r in readers]
        # uint8 crops: normalised on the device after the transfer (transforms.normalize), 4x fewer host bytes
        tf = train_transform(self.image_size, self.mean, self.std, scale=tuple(self.cfg.crop_scale), normalize=False)

        def skip(reason: str, msg: str) -> None:
            stats[reason] += 1
            if stats[reason] <= _MAX_NAMED:
                log.warning(f"{msg}; skipped (counted in data/{reason})")

        while True:
            items = []
            while len(items) < self.micro_batch:
                k = keyed_rng(self.seed, "dataset", stream, counter).choices(range(len(readers)), self.weights)[0]
                counter += 1
                key, img_bytes, texts, shard = next(gens[k])
                epoch = readers[k].epoch  # blocks never span epochs: the epoch the sample was read in
                chosen = self._choose_field(key, epoch, list(texts)) if self.online else next(iter(texts), None)
                if chosen is None:
                    skip("no_caption", f"{shard}: sample '{key}' has none of the caption fields {self.fields}")
                    continue
                text = texts[chosen]
                if not self.online:
                    try:  # only the chosen field's embedding is decoded
                        text = decode_npy(text)
                    except (ValueError, OSError, EOFError) as e:
                        skip("bad_embedding", f"{shard}: embedding '{key}.{field_name(chosen)}.npy' does not decode ({e})")
                        continue
                try:
                    with Image.open(io.BytesIO(img_bytes)) as im:
                        im.load()
                        pixels = tf(im, rng=keyed_rng(self.seed, "crop", key, epoch))
                except Exception as e:  # noqa: BLE001 - any decode failure: skip and count
                    why = "no image format PIL can identify" if isinstance(e, UnidentifiedImageError) else repr(e)
                    skip("corrupt_images", f"{shard}: image of sample '{key}' does not decode ({why})")
                    continue
                items.append((key, pixels, text))
            merged = dict(stats)
            for r in readers:
                for name, v in r.stats.items():
                    merged[name] = merged.get(name, 0) + v
            # np.stack then a view: torch.stack of uint8 images is ~7x slower (1 thread) and pathological with more
            pixels = torch.from_numpy(np.stack([p.numpy() for _, p, _ in items]))
            batch = {"pixels": pixels, "keys": [k for k, _, _ in items],
                     "_worker": logical,
                     "_state": {"datasets": [r.state() for r in readers], "counter": counter, "stats": merged},
                     "_stats": merged}
            if self.online:
                batch["captions"] = [t for _, _, t in items]
            else:
                batch["emb"] = torch.from_numpy(np.stack([t for _, _, t in items]).astype(np.float32))
            if wi is not None:  # a forked/spawned worker's CPU count starts at 0 with the worker
                batch["_loader_cpu"] = (w, time.process_time())
            yield batch

    def _choose_field(self, key: str, epoch: int, available: list[str]) -> str | None:
        """Dense with probability dense_ratio (per sample and epoch), else original; among what exists."""
        r = keyed_rng(self.seed, "field", key, epoch)
        dense = [f for f in self.cfg.dense_fields if f in available]
        orig = [f for f in self.cfg.original_fields if f in available]
        pick_dense = r.random() < self.cfg.dense_ratio
        pool = (dense or orig) if pick_dense else (orig or dense)
        return r.choice(pool) if pool else None

    def _read_unit(self, unit: Unit, start: int, stats: dict, epoch: int) -> Iterator[tuple[int, tuple]]:
        """(sample index, (key, image bytes, {field spec: caption} or {chosen field spec: its embedding's
        .npy bytes}, shard)) of one unit from sample `start` on; offline, the field is chosen here (from
        the manifest's lists of what each key lacks) and only that member is read. The read-time counters
        go into `stats` as they accrue."""
        lo = max(unit.lo, start)
        count = None if unit.hi is None else max(0, unit.hi - lo)
        if self.online:
            rs = ReadStats()
            src = iter_tar_samples(unit.shard, rs, skip=lo, count=count, want={*IMAGE_EXTS, "txt", "json"})
            keep = lambda s: (s, {f: t for f in self.fields if (t := get_caption(s, f)) is not None})  # noqa: E731
            counters = lambda: {"samples_read": rs.samples, "bytes_read": rs.bytes_read,  # noqa: E731
                                "read_errors": len(rs.read_errors), "missing_image": missing}
        else:
            js = JoinStats()
            names = {field_name(f): f for f in self.fields}
            def choose(key: str, have: list[str]) -> str | None:
                spec = self._choose_field(key, epoch, [names[n] for n in have])
                return None if spec is None else field_name(spec)
            src = iter_joined(unit.shard, sidecar_path_for(unit.shard, self.cfg.sidecar), self.fields,
                              self.fingerprint, js, start=lo, count=count, decode=False, choose=choose)
            keep = lambda s: (s, {names[n]: v for n, v in s["emb"].items()})  # noqa: E731
            counters = lambda: {"samples_read": js.samples_read, "bytes_read": js.bytes_read,  # noqa: E731
                                "read_errors": len(js.read_errors), "missing_embedding": js.image_only,
                                "missing_image": js.no_image, "sidecar_only": js.sidecar_only}
        missing = 0
        seen: dict[str, int] = {}

        def account() -> None:
            for name, v in counters().items():
                stats[name] = stats.get(name, 0) + v - seen.get(name, 0)
                seen[name] = v

        try:
            for raw in src:
                idx = raw["__index__"]
                if unit.stride > 1 and idx % unit.stride != unit.phase:
                    continue
                s, texts = keep(raw)
                img = s["jpg"] if not self.online else image_member(s)
                if img is None:
                    missing += 1
                    if missing <= _MAX_NAMED:
                        log.warning(f"{unit.shard}: sample '{s['__key__']}' has no image member; skipped "
                                    "(counted in data/missing_image)")
                    continue
                account()
                yield idx, (s["__key__"], img, texts, unit.shard)
        finally:
            src.close()
            account()


def make_loader(ds: Stage2Stream, num_workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
