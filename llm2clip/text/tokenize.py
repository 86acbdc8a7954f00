"""Tokenise (instruction, text) pairs into batches that carry a mask of the caption tokens.

The template's pieces are tokenised separately and concatenated, so the boundary between the
instruction/template tokens and the caption tokens is exact (no separator-string heuristics): only
`{text}` tokens are marked in `embed_mask` and enter mean pooling.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from llm2clip.schema import TEMPLATES


class TokenizerError(ValueError):
    pass


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


@dataclass
class TextBatch:
    input_ids: torch.Tensor  # [B, T] long
    attention_mask: torch.Tensor  # [B, T] long, 1 = real token
    embed_mask: torch.Tensor  # [B, T] long, 1 = caption token (pooled)

    def to(self, device) -> "TextBatch":
        return TextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.embed_mask.to(device))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class PromptTokenizer:
    """Turns (instruction, caption) into token ids with an exact caption-token mask."""

    def __init__(self, tokenizer, template: str = "none", max_length: int = 512, pooling: str = "mean"):
        self.tok = tokenizer
        tpl = TEMPLATES.get(template, template)
        head, _, tail = tpl.partition("{text}")
        self.head_tpl, self.tail = head, tail
        self.max_length = max_length
        self.pooling = pooling
        probe_core = self._ids("hello")
        probe_full = tokenizer("hello", add_special_tokens=True)["input_ids"]
        i = _find(probe_full, probe_core)
        if i < 0:  # tokenizers that merge specials into words: fall back to no specials
            self.special_prefix, self.special_suffix = [], []
        else:
            self.special_prefix = probe_full[:i]
            self.special_suffix = probe_full[i + len(probe_core):]
        self._cache: dict[str, list[int]] = {}

    def _ids(self, s: str) -> list[int]:
        return self.tok(s, add_special_tokens=False)["input_ids"] if s else []

    def _head_ids(self, instruction: str) -> list[int]:
        key = instruction
        if key not in self._cache:
            self._cache[key] = self.special_prefix + self._ids(self.head_tpl.replace("{instruction}", instruction))
        return self._cache[key]

    def encode_one(self, text: str, instruction: str = "") -> tuple[list[int], list[int]]:
        """Return (ids, embed_mask) for one caption, truncating the caption (never the template)."""
        head = self._head_ids(instruction)
        tail = self._ids(self.tail) + self.special_suffix if self.tail else list(self.special_suffix)
        budget = self.max_length - len(head) - len(tail)
        if budget < 1:
            raise TokenizerError(f"text.max_length={self.max_length} leaves no room for the caption after the "
                                 f"template/instruction ({len(head) + len(tail)} tokens)")
        body = self._ids(text)[:budget]
        ids = head + body + tail
        mask = [0] * len(head) + [1] * len(body) + [0] * len(tail)
        if self.pooling == "cls":
            mask = [1] + [0] * (len(ids) - 1)
        return ids, mask

    def __call__(self, texts: Sequence[str], instructions: Sequence[str] | str = "") -> TextBatch:
        if isinstance(instructions, str):
            instructions = [instructions] * len(texts)
        encoded = [self.encode_one(t, i) for t, i in zip(texts, instructions)]
        return collate(encoded, self.tok.pad_token_id, self.tok.padding_side)


def collate(encoded: list[tuple[list[int], list[int]]], pad_id: int, padding_side: str) -> TextBatch:
    n = max(len(ids) for ids, _ in encoded)
    B = len(encoded)
    input_ids = torch.full((B, n), pad_id, dtype=torch.long)
    attn = torch.zeros((B, n), dtype=torch.long)
    emb = torch.zeros((B, n), dtype=torch.long)
    for b, (ids, m) in enumerate(encoded):
        L = len(ids)
        sl = slice(n - L, n) if padding_side == "left" else slice(0, L)
        input_ids[b, sl] = torch.tensor(ids, dtype=torch.long)
        attn[b, sl] = 1
        emb[b, sl] = torch.tensor(m, dtype=torch.long)
    return TextBatch(input_ids, attn, emb)


def _find(seq: list[int], sub: list[int]) -> int:
    if not sub:
        return -1
    for i in range(len(seq) - len(sub) + 1):
        if seq[i: i + len(sub)] == sub:
            return i
    return -1
