"""Stage-2 batches: image shards joined to their embedding sidecars, exactly resumable mid-epoch.

The data is split into S = world x workers logical streams. Stream s reads its own shards
(`shards[s::S]` per dataset, or every shard keeping every S-th sample when there are fewer shards
than streams), visits them in a seeded order per epoch, and draws each sample's dataset, caption
field and crop from RNGs keyed by (seed, stream, counter) or (seed, epoch, key). A stream's position
is therefore a few integers, carried back with every batch. PyTorch's DataLoader returns batches
round-robin over workers, so after resuming at batch b the loader's worker w plays logical stream
(w + b) mod workers: the sequence of batches continues exactly as without the interruption.
Streams are endless (epochs roll over per stream); steps, not epochs, bound training.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from llm2clip.data.rng import keyed_rng
from llm2clip.data.shards import IMAGE_EXTS, expand_shards, get_caption, image_member, iter_tar_samples, shard_size
from llm2clip.data.sidecar import JoinStats, iter_joined, sidecar_path_for
from llm2clip.data.transforms import train_transform
from llm2clip.schema_embed import field_name
from llm2clip.schema_stage2 import Stage2DataConfig

log = logging.getLogger("llm2clip")


def dataset_shards(spec: str) -> list[list[str]]:
    """'a/*.tar::b/{0..9}.tar' -> [[a shards], [b shards]]."""
    return [expand_shards(part) for part in spec.split("::") if part.strip()]


def dataset_weights(datasets: list[list[str]], weights: list[float]) -> list[float]:
    if weights:
        if len(weights) != len(datasets):
            raise ValueError(f"data.weights has {len(weights)} values for {len(datasets)} datasets ('::'-separated)")
        return list(weights)
    sizes = []
    for shards in datasets:  # by size: sample counts from _stats/sizes.json, else shard counts
        counts = [shard_size(s) for s in shards]
        sizes.append(sum(c if c is not None else 1 for c in counts))
    return [float(s) for s in sizes]


def steps_for_epochs(datasets: list[list[str]], epochs: float, micro_batch: int, world: int, workers: int,
                     grad_accum: int = 1) -> tuple[int, str | None]:
    """Optimizer steps for `epochs` passes over all samples, and a warning when the logical streams
    (world x workers, see the module docstring) hold unequal sample counts: then streams reach their
    epoch boundaries at different steps and "epochs" is approximate."""
    from math import ceil

    S = world * max(workers, 1)
    per_stream = [0] * S
    for shards in datasets:
        sizes = [shard_size(s) for s in shards]
        missing = [s for s, n in zip(shards, sizes) if n is None]
        if missing:
            raise ValueError(f"data.epochs needs sample counts, but {missing[0]} has no _stats.json / sizes.json "
                             "entry; set train.max_steps instead")
        if len(shards) >= S:
            for i, n in enumerate(sizes):
                per_stream[i % S] += n
        else:  # every stream reads all shards and keeps every S-th sample
            for s in range(S):
                per_stream[s] += sum(len(range(s, n, S)) for n in sizes)
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


@dataclass
class StreamSpec:
    stream: int
    n_streams: int


class _DatasetCursor:
    """Position of one logical stream inside one dataset: (epoch, shard position, samples consumed)."""

    def __init__(self, shards: list[str], spec: StreamSpec, seed: int, name: str, state: dict | None):
        S, s = spec.n_streams, spec.stream
        if len(shards) >= S:
            self.shards, self.stride, self.phase = shards[s::S], 1, 0
        else:
            self.shards, self.stride, self.phase = shards, S, s
        self.seed, self.name = seed, name
        st = state or {}
        self.epoch, self.pos, self.offset = st.get("epoch", 0), st.get("pos", 0), st.get("offset", 0)
        self._it: Iterator | None = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset}

    def _order(self) -> list[str]:
        order = list(self.shards)
        keyed_rng(self.seed, self.name, "order", self.epoch, self.phase).shuffle(order)
        return order


class Stage2Stream(torch.utils.data.IterableDataset):
    """Yields collated micro-batches: {"pixels" [B,3,H,W], "emb" [B,d] or "captions", "keys", "_worker",
    "_state", "_stats"}."""

    def __init__(self, cfg: Stage2DataConfig, micro_batch: int, seed: int, rank: int, world: int,
                 image_size: int, mean, std, online: bool, start: dict | None = None,
                 expected_fingerprint: str | None = None):
        self.cfg, self.micro_batch, self.seed = cfg, micro_batch, seed
        self.rank, self.world, self.online = rank, world, online
        self.image_size, self.mean, self.std = image_size, tuple(mean), tuple(std)
        self.datasets = dataset_shards(cfg.shards)
        self.weights = dataset_weights(self.datasets, cfg.weights)
        self.fingerprint = expected_fingerprint
        start = start or {}
        self.worker_states: dict[int, dict] = {int(k): v for k, v in start.get("workers", {}).items()}
        self.rotate = int(start.get("batches", 0))

    # ---- per-worker generator ----------------------------------------------------------------
    def __iter__(self):
        wi = torch.utils.data.get_worker_info()
        nw, w = (wi.num_workers, wi.id) if wi else (1, 0)
        logical = (w + self.rotate) % nw
        spec = StreamSpec(self.rank * nw + logical, self.world * nw)
        st = self.worker_states.get(logical, {})
        cursors = [_DatasetCursor(sh, spec, self.seed, f"ds{i}", st.get("datasets", [None] * len(self.datasets))[i])
                   for i, sh in enumerate(self.datasets)]
        counter = st.get("counter", 0)
        stats = dict(st.get("stats", {"corrupt_images": 0, "no_caption": 0, "skipped_join": 0}))
        gens = [self._samples(c, stats) for c in cursors]
        tf = train_transform(self.image_size, self.mean, self.std, scale=tuple(self.cfg.crop_scale))
        while True:
            items = []
            while len(items) < self.micro_batch:
                k = keyed_rng(self.seed, "dataset", spec.stream, counter).choices(range(len(cursors)), self.weights)[0]
                counter += 1
                item = next(gens[k])
                key, img_bytes, text = item
                try:
                    with Image.open(io.BytesIO(img_bytes)) as im:
                        im.load()
                        pixels = tf(im, rng=keyed_rng(self.seed, "crop", key, cursors[k].epoch))
                except Exception as e:  # noqa: BLE001 - any decode failure: skip and count
                    stats["corrupt_images"] += 1
                    if stats["corrupt_images"] <= 5:
                        log.warning(f"corrupt image in sample '{key}' ({e}); skipped")
                    continue
                items.append((key, pixels, text))
            batch = {"pixels": torch.stack([p for _, p, _ in items]), "keys": [k for k, _, _ in items],
                     "_worker": logical,
                     "_state": {"datasets": [c.state() for c in cursors], "counter": counter, "stats": dict(stats)},
                     "_stats": dict(stats)}
            if self.online:
                batch["captions"] = [t for _, _, t in items]
            else:
                batch["emb"] = torch.from_numpy(np.stack([t for _, _, t in items]).astype(np.float32))
            yield batch

    def _choose_field(self, key: str, epoch: int, available: list[str]) -> str | None:
        """Dense with probability dense_ratio (per sample and epoch), else original; among what exists."""
        r = keyed_rng(self.seed, "field", key, epoch)
        dense = [f for f in self.cfg.dense_fields if f in available]
        orig = [f for f in self.cfg.original_fields if f in available]
        pick_dense = r.random() < self.cfg.dense_ratio
        pool = (dense or orig) if pick_dense else (orig or dense)
        return r.choice(pool) if pool else None

    def _samples(self, c: _DatasetCursor, stats: dict) -> Iterator[tuple[str, bytes, Any]]:
        """Endless (key, image bytes, embedding or caption) for one dataset cursor, advancing its state."""
        fields = list(dict.fromkeys(self.cfg.dense_fields + self.cfg.original_fields))
        while True:
            order = c._order()
            while c.pos < len(order):
                shard = order[c.pos]
                skip = c.offset
                for i, s in enumerate(self._read_shard(shard, fields, stats)):
                    if i < skip:
                        continue
                    c.offset = i + 1
                    if (s["idx"] % c.stride) != c.phase:
                        continue
                    chosen = self._choose_field(s["key"], c.epoch, list(s["texts"]))
                    if chosen is None:
                        stats["no_caption"] += 1
                        continue
                    yield s["key"], s["jpg"], s["texts"][chosen]
                c.pos, c.offset = c.pos + 1, 0
            c.epoch, c.pos, c.offset = c.epoch + 1, 0, 0

    def _read_shard(self, shard: str, fields: list[str], stats: dict) -> Iterator[dict]:
        """Samples of one shard with index, image bytes and {field spec: embedding or caption}."""
        if self.online:
            for s in iter_tar_samples(shard, want={*IMAGE_EXTS, "txt", "json"}):
                texts = {f: t for f in fields if (t := get_caption(s, f)) is not None}
                img = image_member(s)
                if img is None:
                    stats["skipped_join"] += 1
                    continue
                yield {"idx": s["__index__"], "key": s["__key__"], "jpg": img, "texts": texts}
            return
        js = JoinStats()
        names = {field_name(f): f for f in fields}
        sc = sidecar_path_for(shard, self.cfg.sidecar)
        for i, s in enumerate(iter_joined(shard, sc, fields, self.fingerprint, js)):
            texts = {names[n]: v for n, v in s["emb"].items() if n in names}
            yield {"idx": i, "key": s["__key__"], "jpg": s["jpg"], "texts": texts}
        stats["skipped_join"] += js.image_only + js.sidecar_only + js.no_image


def make_loader(ds: Stage2Stream, num_workers: int):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False, prefetch_factor=2 if num_workers else None)
