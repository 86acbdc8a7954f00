"""Keyed randomness: every random choice in the data paths is a pure function of its keys
(seed, epoch, shard, sample key, ...), so any worker or rank makes it identically and a resumed run
makes it again without saving generator state."""
from __future__ import annotations

import random


def keyed_rng(*keys: object) -> random.Random:
    """A random.Random seeded from the keys; stable across processes and Python runs (string seeds are
    hashed with SHA-512, not with the per-process hash())."""
    return random.Random("\x1f".join(map(str, keys)))
