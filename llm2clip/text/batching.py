"""Batch plans for embedding captions: which captions share a forward pass, and in which rows.

A plan is a list of batches; a batch is a list of rows; a row is a list of caption indices.
- `plan_padded`: captions sorted by length, one per row, each batch's rows x longest <= token_budget
  (the bucketing of issue 3).
- `plan_packed`: captions packed several per row (best fit decreasing) into rows as wide as the
  longest caption, batches of rows up to the token budget: almost no padding at all.
- `plan_fixed`: input order, a fixed number per batch (the baseline the benchmarks compare against).
Every plan depends only on the lengths (never on the world size), so results are the same on 1 rank
or many.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from llm2clip.text.tokenize import pack_rows

Plan = list[list[list[int]]]


@dataclass
class EncodeStats:
    captions: int = 0
    tokens: int = 0  # real tokens
    padded_tokens: int = 0  # token slots computed (rows x width), summed over batches
    batches: int = 0
    seconds: float = 0.0

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def add(self, o: "EncodeStats") -> None:
        self.captions += o.captions
        self.tokens += o.tokens
        self.padded_tokens += o.padded_tokens
        self.batches += o.batches
        self.seconds += o.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"captions": self.captions, "tokens": self.tokens, "padded_tokens": self.padded_tokens,
                "batches": self.batches, "padding_fraction": round(self.padding_fraction, 4),
                "seconds": round(self.seconds, 3)}


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped longest first, each batch's size x its longest length <= token_budget
    (a single caption longer than the budget gets a batch of its own). Deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i in order:
        if cur and ((len(cur) + 1) * longest > token_budget or len(cur) >= max_batch_size):
            batches.append(cur)
            cur = []
        if not cur:
            longest = lengths[i]
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def fixed_batches(n: int, batch_size: int) -> list[list[int]]:
    """Naive batching in input order (the baseline the benchmark compares against)."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def plan_padded(lengths: Sequence[int], token_budget: int, max_batch_size: int) -> Plan:
    return [[[i] for i in b] for b in plan_batches(lengths, token_budget, max_batch_size)]


def plan_fixed(n: int, batch_size: int) -> Plan:
    return [[[i] for i in b] for b in fixed_batches(n, batch_size)]


def plan_packed(lengths: Sequence[int], token_budget: int, max_batch_size: int, width: int | None = None) -> Plan:
    """Rows of `width` tokens (default: the longest caption) filled best-fit-decreasing, grouped into
    batches of at most token_budget token slots and max_batch_size captions."""
    if not len(lengths):
        return []
    W = width or max(lengths)
    rows = pack_rows(lengths, W)
    per = max(1, token_budget // W)
    plan: Plan = []
    cur: list[list[int]] = []
    n = 0
    for row in rows:
        if cur and (len(cur) >= per or n + len(row) > max_batch_size):
            plan.append(cur)
            cur, n = [], 0
        cur.append(row)
        n += len(row)
    if cur:
        plan.append(cur)
    return plan


def plan_stats(plan: Plan, lengths: Sequence[int]) -> EncodeStats:
    """Token accounting of a plan without running it: padded rows are as wide as the batch's widest."""
    st = EncodeStats()
    for b in plan:
        w = max(sum(lengths[i] for i in r) for r in b)
        st.add(EncodeStats(sum(len(r) for r in b), sum(lengths[i] for r in b for i in r), len(b) * w, 1))
    return st
