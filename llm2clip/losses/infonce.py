"""Supervised SimCSE / InfoNCE for stage 1, negatives gathered from all ranks with gradient.

Each rank scores its local queries against every positive (and hard negative) of the global batch:
logits [n_local, N_global * (1 + has_neg)], label = the query's own positive. The mean over local
rows, averaged over ranks by the data-parallel gradient reduction, is exactly the loss over the global
batch (see tests/test_infonce_dist.py).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from llm2clip.distributed import gather_no_grad, gather_with_grad, local_offset, row_counts


def text_ids(texts: list[str], device: torch.device | None = None) -> torch.Tensor:
    """Stable 63-bit ids of strings (identical captions -> identical ids) for false-negative masking."""
    vals = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") >> 1 for t in texts]
    return torch.tensor(vals, dtype=torch.long, device=device)


def infonce_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None = None, temperature: float = 0.02,
                 p_ids: torch.Tensor | None = None, n_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """q, p, n: [n_local, D] un-normalised embeddings; *_ids: [n_local] text ids of p and n.

    Cosine similarity / temperature. When ids are given, a column whose text equals the query's
    positive text (an identical caption of another image) is masked out: it is not a negative.
    Returns (loss, {"acc": top-1 accuracy of the positive among the columns}).
    """
    q = F.normalize(q.float(), dim=-1)
    cols = [F.normalize(p.float(), dim=-1)]
    if n is not None:
        cols.append(F.normalize(n.float(), dim=-1))
    counts = row_counts(q.shape[0], q.device)  # once; every gather below reuses it
    cols = [gather_with_grad(c, counts) for c in cols]
    keys = torch.cat(cols, 0)
    logits = q @ keys.T / temperature
    labels = local_offset(q.shape[0], counts) + torch.arange(q.shape[0], device=q.device)
    if p_ids is not None:
        all_ids = [gather_no_grad(p_ids, counts)]
        if n is not None and n_ids is not None:
            all_ids.append(gather_no_grad(n_ids, counts))
        if len(all_ids) == len(cols):
            col_ids = torch.cat(all_ids, 0)
            own = col_ids[labels]
            same = col_ids.unsqueeze(0) == own.unsqueeze(1)
            same[torch.arange(q.shape[0], device=q.device), labels] = False
            logits = logits.masked_fill(same, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    with torch.no_grad():
        acc = (logits.argmax(1) == labels).float().mean()
    return loss, {"acc": float(acc)}
