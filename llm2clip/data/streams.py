"""Which samples a data stream owns, and the shuffled, exactly resumable read over them (stages 1 and 2).

The data is split into S logical streams (stage 2: ranks x loader workers; stage 1: ranks).
`assign_units` gives stream s its *units*:
- at least S non-empty shards: whole shards, shard i to stream i mod S;
- fewer shards than streams: shard i is shared by streams i, i+n, i+2n, ... (n shards), each taking
  a contiguous 1/k of its samples (counts from `shard_size`: `_stats.json` / `sizes.json`; the
  stage-2 sidecar manifest's `image_samples` when given). A stream reaches its range by walking the
  tar headers; on a seekable file the member data before it is seeked over, never read (the cost is
  512 bytes per member header before the range). A shard without a known count cannot be cut into
  ranges: its k streams each walk it and keep every k-th sample (so it is read k times; a warning
  says so).
Shards known to be empty (`successes: 0`) get no stream. Either way every sample is read by exactly
one stream per epoch.

`ShuffledReader` visits a stream's units in a seeded order per epoch, reading up to OPEN_UNITS of
them interleaved into a block of `buffer` samples which it emits in a seeded permutation (a block
shuffle: adjacent samples come from different shards). Its position is a few integers (epoch, block
number, next unit, the open units' positions and the round-robin pointer at the block's start, how
many of the block were emitted) plus the read-time counters at the block's start: a resume re-reads
at most one block and continues bit-identically. Memory: `buffer` samples as *encoded* bytes (JPEG +
one embedding or the captions) per stream and dataset, e.g. 2000 x ~30 KB = 60 MB per loader worker.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from llm2clip.data.rng import keyed_rng

log = logging.getLogger("llm2clip")
OPEN_UNITS = 4  # units read interleaved into one shuffle block (1 with shuffle_buffer=1: no shuffling)
_MAX_NAMED = 5


class EmptyStreamError(RuntimeError):
    """A data stream owns no samples at all; the message names its shards and what to do."""


@dataclass(frozen=True)
class Unit:
    """Samples [lo, hi) of one shard (hi None: to its end), keeping index % stride == phase."""
    shard: str
    lo: int = 0
    hi: int | None = None
    stride: int = 1
    phase: int = 0

    def describe(self) -> str:
        if self.stride > 1:
            return f"{self.shard} (every {self.stride}th sample from #{self.phase})"
        return self.shard if self.lo == 0 and self.hi is None else f"{self.shard}[{self.lo}:{self.hi}]"


def assign_units(shards: list[str], sizes: list[int | None], n_streams: int, stream: int) -> list[Unit]:
    """Units of stream `stream` of `n_streams` (see the module docstring). `sizes`: sample count per shard."""
    live = [(sh, n) for sh, n in zip(shards, sizes) if n != 0]
    S = n_streams
    if len(live) >= S:
        return [Unit(sh, 0, n) for sh, n in live[stream::S]]
    if not live:
        return []
    i = stream % len(live)
    sh, n = live[i]
    k = len(range(i, S, len(live)))  # streams sharing this shard
    j = stream // len(live)
    if n is None:
        return [Unit(sh, 0, None, k, j)]
    lo, hi = j * n // k, (j + 1) * n // k
    return [Unit(sh, lo, hi)] if hi > lo else []


def unit_count(u: Unit, size: int | None) -> int | None:
    """Samples in a unit (None when its shard's count is unknown)."""
    if u.stride > 1:
        return None if size is None else len(range(u.phase, size, u.stride))
    hi = u.hi if u.hi is not None else size
    return None if hi is None else hi - u.lo


def check_streams(datasets: list[list[str]], sizes: list[list[int | None]], n_streams: int) -> None:
    """Before training: every stream owns samples of every dataset (as far as the counts tell); else an
    EmptyStreamError naming the dataset's shards. Warns about shards read more than once."""
    for d, (shards, sz) in enumerate(zip(datasets, sizes)):
        empty = [s for s in range(n_streams) if not assign_units(shards, sz, n_streams, s)]
        if empty:
            have = sum(n or 0 for n in sz)
            raise EmptyStreamError(
                f"dataset {d} ({len(shards)} shards, {have} samples by their counts: {', '.join(shards[:4])}"
                f"{' ...' if len(shards) > 4 else ''}) gives no samples to data stream(s) {empty[:8]} of "
                f"{n_streams} (ranks x loader workers): use fewer ranks or data.num_workers, or more data")
        unknown = [sh for sh, n in zip(shards, sz) if n is None]
        if unknown and len([n for n in sz if n != 0]) < n_streams:
            log.warning(f"{len(unknown)} shard(s) without a sample count (no _stats.json / sizes.json / manifest, "
                        f"e.g. {unknown[0]}) are shared by several of the {n_streams} data streams: each of those "
                        "streams reads the whole shard and keeps its share (re-read); add the counts to read once")


class TopologyError(RuntimeError):
    """The saved data position belongs to another world size x loader workers."""


def check_topology(saved: dict | None, world: int, workers: int, reset: bool) -> dict | None:
    """The data state to resume from: `saved` when it was written by the same world x workers, None
    (start the data position fresh) when `reset`; otherwise a TopologyError. Stream states cannot be
    remapped exactly: the streams' sample ranges and shuffle orders depend on their number."""
    if not saved:
        return None
    old = saved.get("topology")
    new = [world, max(workers, 1)]
    if reset:
        log.warning(f"run.reset_data_position=true: the data position restarts from the beginning (saved "
                    f"topology {old}, now {new[0]} ranks x {new[1]} workers)")
        return None
    if old is not None and list(old) != new:
        raise TopologyError(
            f"the checkpoint's data position was written by {old[0]} ranks x {old[1]} loader workers, but this "
            f"run has {new[0]} ranks x {new[1]} workers: the data streams cannot be remapped exactly. Resume with "
            f"the old topology, or start the data position fresh with --set run.reset_data_position=true "
            "(the model and optimizer still resume; samples may repeat or be skipped in this epoch)")
    return saved


ReadFn = Callable[[Unit, int, dict], Iterator[tuple[int, Any]]]


class ShuffledReader:
    """Endless shuffled samples of one stream's units. `read(unit, start, stats)` yields (sample index,
    item) for the unit's samples with index >= start, counting what it skips into `stats`."""

    def __init__(self, units: list[Unit], read: ReadFn, seed: int, name: str, buffer: int,
                 state: dict | None = None):
        self.units, self.read, self.seed, self.name = units, read, seed, name
        self.buffer = max(1, buffer)
        st = state or {}
        self.epoch, self.block_no = st.get("epoch", 0), st.get("block", 0)
        self.next_unit, self.rr = st.get("next", 0), st.get("rr", 0)
        self.open: list[list[int]] = [list(x) for x in st.get("open", [])]  # [unit position, next index]
        self.drawn = st.get("drawn", 0)
        self.stats: dict[str, int] = dict(st.get("stats", {}))  # read-time counters (as of the block start)
        self._start = self._snapshot()
        self._block: list[Any] = []
        self._gens: dict[int, Iterator] = {}
        self._yields: dict[int, int] = {}
        self._restoring = state is not None and "open" in st

    @property
    def block(self) -> list[Any]:
        """The current block (its item `drawn - 1` is the one last emitted)."""
        return self._block

    def _snapshot(self) -> dict:
        return {"epoch": self.epoch, "block": self.block_no, "next": self.next_unit, "rr": self.rr,
                "open": [list(x) for x in self.open], "stats": dict(self.stats)}

    def state(self) -> dict:
        return {**self._start, "drawn": self.drawn}

    def _order(self) -> list[int]:
        order = list(range(len(self.units)))
        keyed_rng(self.seed, self.name, "order", self.epoch).shuffle(order)
        return order

    def _fill(self) -> None:
        """Read the next block: up to `buffer` samples round-robin over the open units, opening units
        in epoch order as others end; stops at the epoch's end (blocks never span epochs)."""
        order = self._order()
        block: list[Any] = []
        while len(block) < self.buffer:
            while len(self.open) < (OPEN_UNITS if self.buffer > 1 else 1) and self.next_unit < len(order):
                self.open.append([self.next_unit, 0])
                self.next_unit += 1
            if not self.open:
                break
            self.rr %= len(self.open)
            pos, start = self.open[self.rr]
            gen = self._gens.get(pos)
            if gen is None:
                gen = self._gens[pos] = self.read(self.units[order[pos]], start, self.stats)
                self._yields.setdefault(pos, 0)
            got = next(gen, None)
            if got is None:  # unit done
                del self._gens[pos]
                self.open.pop(self.rr)
                if self._yields.pop(pos, 0) == 0 and start == 0:
                    self.stats["empty_units"] = self.stats.get("empty_units", 0) + 1
                    if self.stats["empty_units"] <= _MAX_NAMED:
                        log.warning(f"{self.units[order[pos]].describe()}: no usable sample (empty shard or all "
                                    "skipped); skipped (counted in data/empty_units)")
                continue
            idx, item = got
            self.open[self.rr][1] = idx + 1
            self._yields[pos] = self._yields.get(pos, 0) + 1
            block.append(item)
            self.rr += 1
        keyed_rng(self.seed, self.name, "block", self.epoch, self.block_no).shuffle(block)
        self._block = block

    def __iter__(self) -> Iterator[Any]:
        # items of an epoch read from its start (None: resumed mid-epoch, unknown)
        epoch_items = 0 if (self.block_no == 0 and not self.open and self.next_unit == 0) else None
        if not self._restoring:
            self.drawn = 0
        self._restoring = False
        self._fill()  # a resume re-reads the interrupted block from its start and skips what was emitted
        while True:
            if epoch_items is not None:
                epoch_items += len(self._block)
            while self.drawn < len(self._block):
                item = self._block[self.drawn]
                self.drawn += 1
                yield item
            if not self.open and self.next_unit >= len(self.units):  # the epoch is done
                if epoch_items == 0:
                    raise EmptyStreamError(
                        f"data stream '{self.name}' has no usable sample in a whole epoch; its shards: "
                        + (", ".join(u.describe() for u in self.units[:6]) or "none") +
                        ". Check them (empty tars, missing captions/sidecars) or use fewer ranks/workers")
                self.epoch, self.block_no, self.next_unit, self.rr, self.open = self.epoch + 1, 0, 0, 0, []
                self._gens.clear()
                epoch_items = 0
            else:
                self.block_no += 1
            self.drawn = 0
            self._start = self._snapshot()
            self._fill()
