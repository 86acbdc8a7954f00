"""Stage-1 caption pairs: from the caption fields of image shards, and from JSONL text-pair files.

Exactly resumable without buffering state: within an epoch each rank visits its shards in a seeded
order and each shard's records in a seeded order, and every random choice (which two captions,
which direction, which hard negative) is a pure function of (seed, epoch, shard, record). The
state is therefore three integers per source plus the batch counter.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llm2clip.data.rng import keyed_rng
from llm2clip.data.shards import ReadStats, expand_shards, field_extensions, get_caption, iter_tar_samples
from llm2clip.schema import PairSourceConfig, Stage1DataConfig

log = logging.getLogger("llm2clip")
_MAX_NAMED = 5  # how many skipped samples are named in the log per source


@dataclass
class Example:
    query: str
    positive: str
    negative: str | None
    key: str = ""  # where it came from ("shard.tar/sample key", "file.jsonl:line"), named when a step fails


class ShardPairSource:
    """Positive pairs = two different caption fields of one sample; hard negative = the positive's
    field of another sample of the same shard."""

    def __init__(self, cfg: PairSourceConfig, seed: int, rank: int, world: int, name: str):
        self.cfg, self.seed, self.name = cfg, seed, name
        shards = expand_shards(cfg.path)
        # Disjoint shards per rank when there are enough; otherwise every rank reads all shards and
        # keeps every world-th record.
        if len(shards) >= world:
            self.shards, self.stride, self.phase = shards[rank::world], 1, 0
        else:
            self.shards, self.stride, self.phase = shards, world, rank
        self.has_negatives = True
        self.epoch, self.pos, self.offset = 0, 0, 0
        self._records: list[tuple[str, str, list[tuple[str, str]]]] | None = None
        self.skipped = 0
        self.read = ReadStats()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "offset": self.offset, "skipped": self.skipped}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.epoch, self.pos, self.offset = st["epoch"], st["pos"], st["offset"]
        self.skipped = st.get("skipped", 0)
        self._records = None

    def _order(self) -> list[int]:
        order = list(range(len(self.shards)))
        keyed_rng(self.seed, self.name, "shards", self.epoch).shuffle(order)
        return order

    def _load(self) -> list[tuple[str, str, list[tuple[str, str]]]]:
        shard = self.shards[self._order()[self.pos]]
        recs = []
        want = field_extensions(self.cfg.fields)
        for i, s in enumerate(iter_tar_samples(shard, self.read, want=want)):
            if i % self.stride != self.phase:
                continue
            caps = [(f, c) for f in self.cfg.fields if (c := get_caption(s, f)) is not None]
            if len(caps) < 2:
                self.skipped += 1
                if self.skipped <= _MAX_NAMED:
                    missing = [f for f in self.cfg.fields if f not in {x for x, _ in caps}]
                    log.warning(f"{shard}: sample '{s['__key__']}' lacks caption field(s) {missing} (missing or "
                                f"empty); skipped (counted in data/skipped)")
                continue
            recs.append((shard, s["__key__"], caps))
        keyed_rng(self.seed, self.name, "records", self.epoch, shard).shuffle(recs)
        if len(recs) == 1:
            raise ValueError(f"{shard}: only one usable sample; hard negatives need at least two per shard "
                             "(set data.hard_negatives=false or use larger shards)")
        return recs

    def next(self) -> Example:
        while True:
            if self._records is None:
                self._records = self._load()
            if self.offset < len(self._records):
                break
            self._records, self.offset = None, 0
            self.pos += 1
            if self.pos >= len(self.shards):
                self.pos, self.epoch = 0, self.epoch + 1
        recs = self._records
        shard, key, caps = recs[self.offset]
        r = keyed_rng(self.seed, self.name, "pair", self.epoch, shard, key)
        (fq, q), (fp, p) = r.sample(caps, 2)  # random pair of distinct fields, random direction
        j = r.randrange(len(recs) - 1)
        j = j + 1 if j >= self.offset else j
        other = dict(recs[j][2])
        neg = other.get(fp) or next(iter(other.values()))
        self.offset += 1
        return Example(q, p, neg, f"{Path(shard).name}/{key}")


class JsonlPairSource:
    """E5/Echo-style text pairs: one JSON object per line with "query", "positive" and optionally
    "negative". Loaded once; visited in a seeded permutation per epoch, every world-th line per rank."""

    def __init__(self, cfg: PairSourceConfig, seed: int, rank: int, world: int, name: str):
        self.seed, self.name, self.rank, self.world = seed, name, rank, world
        self.rows: list[tuple[str, str, str | None, str]] = []  # (query, positive, negative, file:line)
        for path in expand_shards(cfg.path):
            for ln, line in enumerate(Path(path).read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    self.rows.append((str(d["query"]), str(d["positive"]),
                                      str(d["negative"]) if d.get("negative") else None, f"{Path(path).name}:{ln}"))
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{ln}: malformed pair line ({e!r}); expected "
                                     '{"query": ..., "positive": ..., "negative": ... (optional)}') from None
        if len(self.rows) < world:
            raise ValueError(f"{cfg.path}: {len(self.rows)} pairs, fewer than the {world} ranks")
        self.has_negatives = all(r[2] is not None for r in self.rows)
        self.epoch, self.offset = 0, 0
        self._perm: list[int] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.epoch, self.offset, self._perm = st["epoch"], st["offset"], None

    def next(self) -> Example:
        if self._perm is None:
            perm = list(range(len(self.rows)))
            keyed_rng(self.seed, self.name, "perm", self.epoch).shuffle(perm)
            self._perm = perm[self.rank::self.world]
        if self.offset >= len(self._perm):
            self.epoch, self.offset, self._perm = self.epoch + 1, 0, None
            return self.next()
        q, p, n, where = self.rows[self._perm[self.offset]]
        self.offset += 1
        return Example(q, p, n, where)


class PairStream:
    """Micro-batches of Examples mixed from several sources by weight.

    With `single_source_batches`, the source of batch b is drawn from (seed, b) only, so every rank
    picks the same one and each global batch comes from a single source (the authors' setting).
    """

    def __init__(self, cfg: Stage1DataConfig, micro_batch: int, seed: int, rank: int, world: int):
        self.cfg, self.micro_batch, self.seed, self.rank = cfg, micro_batch, seed, rank
        self.sources = []
        for i, s in enumerate(cfg.sources):
            cls = ShardPairSource if s.kind == "shards" else JsonlPairSource
            self.sources.append(cls(s, seed, rank, world, f"src{i}"))
        self.weights = [s.weight for s in cfg.sources]
        self.batch_index = 0
        self.use_neg_mixed = cfg.hard_negatives and all(s.has_negatives for s in self.sources)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.batch_index = st["batch_index"]
        for s, ss in zip(self.sources, st["sources"]):
            s.load_state_dict(ss)

    @property
    def skipped(self) -> int:
        return sum(getattr(s, "skipped", 0) for s in self.sources)

    def next_batch(self) -> tuple[list[Example], bool]:
        """(examples, use_negatives) — use_negatives is identical on all ranks for this batch."""
        b = self.batch_index
        self.batch_index += 1
        if self.cfg.single_source_batches or len(self.sources) == 1:
            k = keyed_rng(self.seed, "batch-source", b).choices(range(len(self.sources)), self.weights)[0]
            src = self.sources[k]
            return [src.next() for _ in range(self.micro_batch)], self.cfg.hard_negatives and src.has_negatives
        r = keyed_rng(self.seed, "example-source", b, self.rank)
        ks = r.choices(range(len(self.sources)), self.weights, k=self.micro_batch)
        return [self.sources[k].next() for k in ks], self.use_neg_mixed

    def __iter__(self) -> Iterator[tuple[list[Example], bool]]:
        while True:
            yield self.next_batch()


def load_caption_pairs(path: str, fields: list[str], max_samples: int) -> tuple[list[str], list[str], list[str]]:
    """Held-out (keys, caption1, caption2) for CRA from image shards; samples lacking a field are skipped."""
    keys, c1, c2 = [], [], []
    want = field_extensions(fields)
    for shard in expand_shards(path):
        for s in iter_tar_samples(shard, want=want):
            a, b = get_caption(s, fields[0]), get_caption(s, fields[1])
            if a is None or b is None:
                continue
            keys.append(s["__key__"])
            c1.append(a)
            c2.append(b)
            if len(keys) >= max_samples:
                return keys, c1, c2
    return keys, c1, c2
