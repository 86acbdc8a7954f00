"""Tokenise (instruction, text) pairs, mark the tokens that are pooled, and lay captions out in rows.

The template's pieces are tokenised separately and concatenated, so the boundary between the
instruction/template tokens and the caption tokens is exact (no separator-string heuristics).

Which tokens enter the pooled mean (`pool_mask`):
- `pool_scope=llm2vec` (default): the caption and the template's closing tokens (e.g. llama3's
  `<|eot_id|>`), as llm2vec's embed mask does (it marks everything after the instruction).
- `pool_scope=caption`: the caption tokens only.
- `pool_special_tokens`: also the tokenizer's own special tokens around the text ([CLS]/[SEP], BOS);
  default on for encoder-only models (sentence-transformers' mean pooling: every non-pad token), off
  for decoders (llm2vec leaves BOS out).

Layout: a `TextBatch` is rows of token ids. Padded: one caption per row (`seg_ids` None). Packed:
several captions per row, `seg_ids` naming each token's caption (-1 = padding); the encoder keeps
captions from attending to each other and restarts positions per caption.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from llm2clip.schema import TEMPLATES


class TokenizerError(ValueError):
    pass


class EmptyCaptionError(ValueError):
    """An empty or whitespace-only caption: it would pool to a zero vector."""


def load_tokenizer(path: str, pad_token: str = "error", padding_side: str = "left"):
    """AutoTokenizer from a local folder; a missing pad token is an error unless pad_token='eos'."""
    from transformers import AutoTokenizer

    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {p} (set text.tokenizer_path or text.model_path "
                                "to a local HuggingFace model folder)")
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token_id is None:
        if pad_token == "eos" and tok.eos_token_id is not None:
            tok.pad_token = tok.eos_token
        else:
            raise TokenizerError(f"tokenizer at {p} has no pad token; set text.pad_token=eos to pad with the "
                                 f"EOS token ({tok.eos_token!r}), as the authors do for Llama-3")
    tok.padding_side = padding_side
    return tok


Encoded = tuple[list[int], list[int]]  # (token ids, pool mask) of one caption


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [R, W] long
    attention_mask: torch.Tensor  # [R, W] long, 1 = real token
    embed_mask: torch.Tensor  # [R, W] long, 1 = pooled token
    seg_ids: torch.Tensor | None = None  # [R, W] long caption index (-1 = pad); None = caption r in row r

    def to(self, device) -> "TextBatch":
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.embed_mask.to(device),
                         None if self.seg_ids is None else self.seg_ids.to(device))

    @property
    def n_tokens(self) -> int:
        """Real (non-pad) tokens."""
        return int(self.attention_mask.sum())

    @property
    def n_slots(self) -> int:
        """Token slots computed (rows x width), pads included."""
        return int(self.input_ids.numel())

    @property
    def n_captions(self) -> int:
        return int(self.input_ids.shape[0]) if self.seg_ids is None else int(self.seg_ids.max()) + 1


def check_captions(texts: Sequence[str], labels: Sequence[str] | None = None, policy: str = "error",
                   where: str = "") -> list[int]:
    """Indices of the usable captions. An empty / whitespace-only one raises EmptyCaptionError naming
    it (`labels[i]`, e.g. "shard.tar key 000012 field txt"), or is dropped under policy="skip"."""
    bad = [i for i, t in enumerate(texts) if not t or not t.strip()]
    if bad and policy == "error":
        raise empty_caption_error([labels[i] if labels is not None else f"text #{i}" for i in bad], where)
    drop = set(bad)
    return [i for i in range(len(texts)) if i not in drop]


def empty_caption_error(names: Sequence[str], where: str = "") -> EmptyCaptionError:
    return EmptyCaptionError(f"{where + ': ' if where else ''}{len(names)} empty or whitespace-only caption(s), "
                             f"e.g. {', '.join(names[:5])}: it would pool to a zero vector. Fix the data, or set "
                             "text.empty_captions=skip to skip them (they are counted)")


class PromptTokenizer:
    """Turns (instruction, caption) into token ids with an exact pooling mask; batched (one tokenizer
    call per batch of captions; the template pieces are tokenised once)."""

    def __init__(self, tokenizer, template: str = "none", max_length: int = 512, pooling: str = "mean",
                 pool_scope: str = "llm2vec", pool_special_tokens: bool = False):
        self.tok = tokenizer
        tpl = TEMPLATES.get(template, template)
        head, _, tail = tpl.partition("{text}")
        self.head_tpl, self.tail = head, tail
        self.max_length = max_length
        self.pooling = pooling
        self.pool_scope, self.pool_special = pool_scope, pool_special_tokens
        probe_core = self._ids("hello")
        probe_full = tokenizer("hello", add_special_tokens=True)["input_ids"]
        i = _find(probe_full, probe_core)
        if i < 0:  # tokenizers that merge specials into words: fall back to no specials
            self.special_prefix, self.special_suffix = [], []
        else:
            self.special_prefix = probe_full[:i]
            self.special_suffix = probe_full[i + len(probe_core):]
        self.tail_ids = self._ids(self.tail)
        self._heads: dict[str, list[int]] = {}

    # One call at a time: stage 1 tokenises its batches in a prefetch thread while CRA evaluation tokenises
    # in the training thread, and a fast tokenizer shared by two threads can fail ("Already borrowed")
    # when a call changes its padding/truncation settings. The Rust work itself still releases the GIL.
    _lock = threading.Lock()

    def _ids(self, s: str) -> list[int]:
        if not s:
            return []
        with self._lock:
            return self.tok(s, add_special_tokens=False)["input_ids"]

    def _head_ids(self, instruction: str) -> list[int]:
        if instruction not in self._heads:
            self._heads[instruction] = self._ids(self.head_tpl.replace("{instruction}", instruction))
        return self._heads[instruction]

    def encode(self, texts: Sequence[str], instructions: Sequence[str] | str = "") -> list[Encoded]:
        """[(ids, pool_mask)] per caption; the caption is truncated, never the template."""
        if isinstance(instructions, str):
            instructions = [instructions] * len(texts)
        bodies = []
        if len(texts):
            with self._lock:
                bodies = self.tok(list(texts), add_special_tokens=False)["input_ids"]
        pre, suf, tail = self.special_prefix, self.special_suffix, self.tail_ids
        tail_pool = 1 if self.pool_scope == "llm2vec" else 0
        sp = 1 if self.pool_special else 0
        out = []
        for body, instr in zip(bodies, instructions):
            head = self._head_ids(instr)
            budget = self.max_length - len(pre) - len(head) - len(tail) - len(suf)
            if budget < 1:
                raise TokenizerError(f"text.max_length={self.max_length} leaves no room for the caption after the "
                                     f"template/instruction ({self.max_length - budget} tokens)")
            body = body[:budget]
            ids = pre + head + body + tail + suf
            if self.pooling == "cls":
                mask = [1] + [0] * (len(ids) - 1)
            elif self.pooling == "last":
                mask = [0] * (len(ids) - 1) + [1]
            else:
                mask = [sp] * len(pre) + [0] * len(head) + [1] * len(body) + [tail_pool] * len(tail) + [sp] * len(suf)
            out.append((ids, mask))
        return out

    def encode_one(self, text: str, instruction: str = "") -> Encoded:
        return self.encode([text], instruction)[0]

    def __call__(self, texts: Sequence[str], instructions: Sequence[str] | str = "") -> TextBatch:
        """A padded batch (one caption per row) on the tokenizer's padding side."""
        return collate(self.encode(texts, instructions), self.tok.pad_token_id, self.tok.padding_side)


def collate(encoded: Sequence[Encoded], pad_id: int, padding_side: str = "right") -> TextBatch:
    """One caption per row, padded to the longest. Rows are padded as Python lists and each field
    becomes one tensor (per-row tensors and slice assignments took twice as long, issue 16)."""
    n = max(len(ids) for ids, _ in encoded)
    left = padding_side == "left"
    ids_rows, attn_rows, emb_rows = [], [], []
    for ids, m in encoded:
        k = n - len(ids)
        ids_rows.append([pad_id] * k + list(ids) if left else list(ids) + [pad_id] * k)
        attn_rows.append([0] * k + [1] * len(ids) if left else [1] * len(ids) + [0] * k)
        emb_rows.append([0] * k + list(m) if left else list(m) + [0] * k)
    return TextBatch(torch.tensor(ids_rows, dtype=torch.long), torch.tensor(attn_rows, dtype=torch.long),
                     torch.tensor(emb_rows, dtype=torch.long))


def pack_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Captions (by index) into rows of `width` tokens, best fit decreasing: each row is opened with
    the longest caption left and topped up with the longest that still fits. Deterministic; a
    caption longer than `width` gets a row of its own."""
    from bisect import bisect_right

    by_len: dict[int, list[int]] = {}
    for i in reversed(range(len(lengths))):  # pop() then yields the lowest index first
        by_len.setdefault(lengths[i], []).append(i)
    keys = sorted(by_len)
    rows: list[list[int]] = []
    while keys:
        row, room, k = [], width, len(keys) - 1
        while k >= 0:
            L = keys[k]
            row.append(by_len[L].pop())
            room -= L
            if not by_len[L]:
                del by_len[L]
                keys.pop(k)
            k = bisect_right(keys, room) - 1
        rows.append(row)
    return rows


def collate_packed(encoded: Sequence[Encoded], rows: Sequence[Sequence[int]], pad_id: int,
                   width: int | None = None) -> TextBatch:
    """Captions laid out in `rows` (indices into `encoded`), right-padded to `width` (default: the
    fullest row). seg_ids numbers the captions 0..n-1 in `rows` order (row by row)."""
    used = [sum(len(encoded[i][0]) for i in r) for r in rows]
    W = max(max(used), width or 0)
    ids_rows, attn_rows, emb_rows, seg_rows = [], [], [], []
    c = 0
    for row, L in zip(rows, used):
        k = W - L
        ids_rows.append([t for i in row for t in encoded[i][0]] + [pad_id] * k)
        attn_rows.append([1] * L + [0] * k)
        emb_rows.append([m for i in row for m in encoded[i][1]] + [0] * k)
        seg_rows.append([c + j for j, i in enumerate(row) for _ in encoded[i][0]] + [-1] * k)
        c += len(row)
    t = lambda rs: torch.tensor(rs, dtype=torch.long)  # noqa: E731
    return TextBatch(t(ids_rows), t(attn_rows), t(emb_rows), t(seg_rows))


def _find(seq: list[int], sub: list[int]) -> int:
    if not sub:
        return -1
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            return i
    return -1
