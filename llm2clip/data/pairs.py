"""Stage-1 caption pairs: from the caption fields of image shards, and from JSONL text-pair files.

Shard sources are split over ranks by `llm2clip.data.streams` (whole shards or sample ranges: each
sample read by one rank once per epoch; only the caption members are read, image data is seeked
over) and read through its seeded block shuffle (`data.shuffle_buffer` records from up to 4 open
shards). Every random choice (which two captions, which direction, which hard negative from the
block) is a pure function of (seed, epoch, shard, record), so a source's state is a few integers
(the reader's position at its block start) plus the previous example's positive; with the batch
counter that makes the stream exactly resumable.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from llm2clip.data.rng import keyed_rng
from llm2clip.data.shards import ReadStats, expand_shards, field_extensions, get_caption, iter_tar_samples, shard_size
from llm2clip.data.streams import ShuffledReader, Unit, assign_units, check_streams
from llm2clip.schema import PairSourceConfig, Stage1DataConfig

log = logging.getLogger("llm2clip")
_MAX_NAMED = 5  # how many skipped samples are named in the log per source


@dataclass
class Example:
    query: str
    positive: str
    negative: str | None
    key: str = ""  # where it came from ("shard.tar/sample key", "file.jsonl:line"), named when a step fails
    instruction: str | None = None  # the source's query instruction; None: data.query_instruction


class ShardPairSource:
    """Positive pairs = two different caption fields of one sample; hard negative = the positive's
    field of another sample of the same shuffle block (records of up to 4 shards; see data/streams.py).
    A block holding a single record takes the previous example's positive as its negative."""

    def __init__(self, cfg: PairSourceConfig, seed: int, rank: int, world: int, name: str,
                 shuffle_buffer: int = 1000, negatives: bool = True):
        self.cfg, self.seed, self.name, self.negatives = cfg, seed, f"{name}.r{rank}", negatives
        shards = expand_shards(cfg.path)
        counts = [shard_size(s) for s in shards]
        check_streams([shards], [counts], world)  # every rank has samples (as far as counts tell), before any model
        self.units = assign_units(shards, counts, world, rank)
        # samples in the source (for mixing by size); None when a shard has no _stats.json / sizes.json
        self.size = None if any(c is None for c in counts) else sum(counts)
        self.buffer = shuffle_buffer
        self.has_negatives = True
        self._saved: dict[str, Any] | None = None
        self._reader: ShuffledReader | None = None
        self._it: Iterator | None = None
        self._last: list[str] | None = None  # [key, positive] of the previous example

    @property
    def skipped(self) -> int:
        return (self._reader.stats if self._reader else (self._saved or {}).get("stats", {})).get("skipped", 0)

    def state_dict(self) -> dict[str, Any]:
        st = self._reader.state() if self._reader is not None else dict(self._saved or {})
        return {**st, "last": self._last}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self._saved, self._last = dict(st), st.get("last")
        self._reader = self._it = None

    def _read_unit(self, unit: Unit, start: int, stats: dict) -> Iterator[tuple[int, tuple]]:
        """(sample index, (shard, key, [(field, caption)])) of one unit's samples with >= 2 captions."""
        rs = ReadStats()
        lo = max(unit.lo, start)
        count = None if unit.hi is None else max(0, unit.hi - lo)
        seen = {"samples_read": 0, "bytes_read": 0, "read_errors": 0}

        def account() -> None:
            for k, v in (("samples_read", rs.samples), ("bytes_read", rs.bytes_read),
                         ("read_errors", len(rs.read_errors))):
                stats[k] = stats.get(k, 0) + v - seen[k]
                seen[k] = v

        src = iter_tar_samples(unit.shard, rs, skip=lo, count=count, want=field_extensions(self.cfg.fields))
        try:
            for s in src:
                if unit.stride > 1 and s["__index__"] % unit.stride != unit.phase:
                    continue
                caps = [(f, c) for f in self.cfg.fields if (c := get_caption(s, f)) is not None]
                if len(caps) < 2:
                    stats["skipped"] = stats.get("skipped", 0) + 1
                    if stats["skipped"] <= _MAX_NAMED:
                        missing = [f for f in self.cfg.fields if f not in {x for x, _ in caps}]
                        log.warning(f"{unit.shard}: sample '{s['__key__']}' lacks caption field(s) {missing} "
                                    "(missing or empty); skipped (counted in data/skipped)")
                    continue
                account()
                yield s["__index__"], (unit.shard, s["__key__"], caps)
        finally:
            src.close()
            account()

    def next(self) -> Example:
        if self._it is None:
            self._reader = ShuffledReader(self.units, self._read_unit, self.seed, self.name, self.buffer, self._saved)
            self._it = iter(self._reader)
        shard, key, caps = next(self._it)
        r = keyed_rng(self.seed, self.name, "pair", self._reader.epoch, shard, key)
        (fq, q), (fp, p) = r.sample(caps, 2)  # random pair of distinct fields, random direction
        neg = None
        if self.negatives:
            block, i = self._reader.block, self._reader.drawn - 1
            if len(block) > 1:
                j = r.randrange(len(block) - 1)
                other = dict(block[j + 1 if j >= i else j][2])
                neg = other.get(fp) or next(iter(other.values()))
            elif self._last is not None and self._last[0] != f"{shard}/{key}":
                neg = self._last[1]
            else:
                raise ValueError(f"{shard}: '{key}' is the only usable caption sample of this rank's data, so it has "
                                 "no hard negative; set data.hard_negatives=false or add data")
        self._last = [f"{shard}/{key}", p]
        return Example(q, p, neg, f"{Path(shard).name}/{key}", self.cfg.instruction)


class JsonlPairSource:
    """E5/Echo-style text pairs: one JSON object per line with "query", "positive" and optionally
    "negative". Loaded once; visited in a seeded permutation per epoch, every world-th line per rank."""

    def __init__(self, cfg: PairSourceConfig, seed: int, rank: int, world: int, name: str):
        self.seed, self.name, self.rank, self.world = seed, name, rank, world
        self.instruction = cfg.instruction
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
        self.size = len(self.rows)
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
        return Example(q, p, n, where, self.instruction)


def source_weights(cfgs: list[PairSourceConfig], sources: list) -> list[float]:
    """Each source's sampling weight: its configured weight, else its size (samples / pairs), so that
    by default every pair is drawn about equally often, as the authors mix datasets."""
    if len(cfgs) == 1:
        return [1.0]  # nothing to mix
    out = []
    for i, (c, s) in enumerate(zip(cfgs, sources)):
        if c.weight is not None:
            out.append(float(c.weight))
        elif s.size:
            out.append(float(s.size))
        else:
            raise ValueError(f"data.sources[{i}] ({c.path}): no sample counts (_stats.json / sizes.json) to mix by "
                             f"size; set data.sources[{i}].weight")
    return out


class PairStream:
    """Micro-batches of Examples mixed from several sources by weight.

    With `single_source_batches`, the source of batch b is drawn from (seed, b) only, so every rank
    picks the same one and each global batch comes from a single source (the authors' setting).
    """

    def __init__(self, cfg: Stage1DataConfig, micro_batch: int, seed: int, rank: int, world: int):
        self.cfg, self.micro_batch, self.seed, self.rank, self.world = cfg, micro_batch, seed, rank, world
        self.sources = []
        for i, s in enumerate(cfg.sources):
            cls = ShardPairSource if s.kind == "shards" else JsonlPairSource
            if s.kind == "shards":
                self.sources.append(cls(s, seed, rank, world, f"src{i}", cfg.shuffle_buffer, cfg.hard_negatives))
            else:
                self.sources.append(cls(s, seed, rank, world, f"src{i}"))
        self.weights = source_weights(cfg.sources, self.sources)
        self.batch_index = 0
        self.use_neg_mixed = cfg.hard_negatives and all(s.has_negatives for s in self.sources)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_index": self.batch_index, "sources": [s.state_dict() for s in self.sources],
                "topology": [self.world, 1]}

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


def load_caption_pairs(path: str, fields: list[str], max_samples: int) \
        -> tuple[list[str], list[str], list[str], list[str]]:
    """Held-out (keys, caption1, caption2, further captions) for CRA from image shards: fields[0] is the
    query, fields[1] the answer, fields[2:] further captions of the sample that join the gallery (every
    caption of the split, as the paper counts). Samples lacking field 0 or 1 are skipped."""
    keys, c1, c2, extra = [], [], [], []
    want = field_extensions(fields)
    for shard in expand_shards(path):
        for s in iter_tar_samples(shard, want=want):
            a, b = get_caption(s, fields[0]), get_caption(s, fields[1])
            if a is None or b is None:
                continue
            keys.append(s["__key__"])
            c1.append(a)
            c2.append(b)
            extra.extend(t for t in (get_caption(s, f) for f in fields[2:]) if t is not None)
            if len(keys) >= max_samples:
                return keys, c1, c2, extra
    return keys, c1, c2, extra
