"""Evaluation metrics: image-text retrieval R@k, zero-shot classification, CRA.

Pure torch on CPU; no distributed code (gather features first, then call these).

Conventions shared by every function here:

- Results are **percentages** in [0, 100], returned as plain Python floats.
- Ties are scored **pessimistically**: a wrong candidate whose score is equal to the
  best correct one ranks ahead of it. A constant similarity matrix therefore scores ~0
  (exactly 0 when k is smaller than the number of wrong candidates), never 100, so a
  collapsed model cannot look good.
- Work is chunked over query rows, so memory is O(chunk x gallery), never
  O(n x n x k): 5k images x 25k captions runs in a few hundred MB.
- Everything is deterministic: ranks are integer counts, not sorts.
- NaN scores raise ``ValueError``: a NaN compares false with everything and would
  silently make a wrong candidate rank *behind* the right one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_DEFAULT_CHUNK = 256


def _check_finite_or_inf(x: torch.Tensor, what: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{what} contains NaN values; fix the features before scoring")


def _as_ks(ks: Sequence[int]) -> list[int]:
    ks = [int(k) for k in ks]
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def retrieval_metrics(
    sim: torch.Tensor,
    txt_to_img: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = _DEFAULT_CHUNK,
) -> dict[str, float]:
    """Image->text and text->image recall@k.

    Args:
        sim: ``[n_images, n_texts]`` similarity (any float dtype; higher = more similar).
        txt_to_img: ``[n_texts]`` integer index of the image each caption belongs to.
        ks: cut-offs. A k larger than the gallery counts every query as a hit.
        chunk_size: query rows scored at once (memory knob only; results do not change).

    Returns:
        ``{"i2t_R@1": .., "i2t_R@5": .., ..., "t2i_R@1": .., ...}`` in percent.

        - image->text: an image is a hit at k if ANY of its captions ranks within the
          top k texts; the rank of an image is the number of *other images'* captions
          scoring >= its best caption (pessimistic ties).
        - text->image: a caption is a hit at k if its image ranks within the top k
          images; rank = number of other images scoring >= its own image.

    Raises:
        ValueError: shape mismatch, an index out of range, an image without any caption
            (it could never be a hit and would silently lower i2t), or NaN in ``sim``.
    """
    ks = _as_ks(ks)
    if sim.dim() != 2:
        raise ValueError(f"sim must be [n_images, n_texts], got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    t2i = torch.as_tensor(txt_to_img, dtype=torch.long).to(sim.device)
    if t2i.shape != (n_txt,):
        raise ValueError(f"txt_to_img must have shape [{n_txt}] (one entry per column of sim), got {tuple(t2i.shape)}")
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"empty similarity matrix {tuple(sim.shape)}")
    if t2i.min() < 0 or t2i.max() >= n_img:
        raise ValueError(f"txt_to_img values must lie in [0, {n_img - 1}], "
                         f"got range [{int(t2i.min())}, {int(t2i.max())}]")
    caps_per_img = torch.bincount(t2i, minlength=n_img)
    if (caps_per_img == 0).any():
        bad = torch.nonzero(caps_per_img == 0).flatten()[:5].tolist()
        raise ValueError(
            f"{int((caps_per_img == 0).sum())} image(s) have no caption (first: {bad}); "
            "image->text recall is undefined for them. Drop them or give them captions."
        )
    _check_finite_or_inf(sim, "sim")

    # image -> text
    i2t_rank = torch.empty(n_img, dtype=torch.long)
    for start in range(0, n_img, chunk_size):
        rows = sim[start : start + chunk_size].float()
        img_idx = torch.arange(start, start + rows.shape[0], device=sim.device)
        pos = t2i.unsqueeze(0) == img_idx.unsqueeze(1)  # [b, n_txt]
        best_pos = torch.where(pos, rows, torch.full_like(rows, float("-inf"))).amax(dim=1)
        ahead = (rows >= best_pos.unsqueeze(1)) & ~pos
        i2t_rank[start : start + rows.shape[0]] = ahead.sum(dim=1).cpu()

    # text -> image
    t2i_rank = torch.empty(n_txt, dtype=torch.long)
    for start in range(0, n_txt, chunk_size):
        cols = sim[:, start : start + chunk_size].float().t()  # [b, n_img]
        own = t2i[start : start + cols.shape[0]]
        pos_score = cols.gather(1, own.unsqueeze(1))  # [b, 1]
        ahead = cols >= pos_score
        ahead.scatter_(1, own.unsqueeze(1), False)  # the positive itself is not ahead of itself
        t2i_rank[start : start + cols.shape[0]] = ahead.sum(dim=1).cpu()

    out: dict[str, float] = {}
    for k in ks:
        out[f"i2t_R@{k}"] = 100.0 * float((i2t_rank < k).sum()) / n_img
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float((t2i_rank < k).sum()) / n_txt
    return out


def zeroshot_classifier(text_features_per_class: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Class weights from per-template text features (OpenAI CLIP protocol).

    Each template embedding is L2-normalised, the templates of a class are averaged,
    and the mean is L2-normalised again.

    Args:
        text_features_per_class: ``[C, T, D]`` tensor, or a list of C tensors ``[T_c, D]``
            (the number of templates may differ per class). Un-normalised is fine.

    Returns:
        ``[C, D]`` float32, unit-norm rows. Logits are then ``100 * image_features @ W.T``
        with L2-normalised image features.
    """
    if isinstance(text_features_per_class, torch.Tensor):
        if text_features_per_class.dim() != 3:
            raise ValueError(f"expected [C, T, D], got shape {tuple(text_features_per_class.shape)}")
        per_class = list(text_features_per_class)
    else:
        per_class = list(text_features_per_class)
    if not per_class:
        raise ValueError("no classes given")
    weights = []
    for c, feats in enumerate(per_class):
        feats = torch.as_tensor(feats).float()
        if feats.dim() != 2 or feats.shape[0] == 0:
            raise ValueError(f"class {c}: expected [T, D] with T >= 1 templates, got shape {tuple(feats.shape)}")
        _check_finite_or_inf(feats, f"text features of class {c}")
        feats = feats / feats.norm(dim=-1, keepdim=True)
        mean = feats.mean(dim=0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


def zeroshot_accuracy(
    logits: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Top-k classification accuracy.

    Args:
        logits: ``[N, C]`` scores (any monotone scale; softmax not needed).
        labels: ``[N]`` true class index per sample.
        ks: cut-offs; each k is clipped to C (so top5 on a 3-class task is top3 = 100).

    Returns:
        ``{"top1": .., "top5": ..}`` in percent (key named after the requested k).
        A sample is correct at k if fewer than k *other* classes score >= the true class
        (pessimistic ties).
    """
    ks = _as_ks(ks)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    n, c = logits.shape
    y = torch.as_tensor(labels, dtype=torch.long).to(logits.device)
    if y.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(y.shape)}")
    if n == 0:
        raise ValueError("no samples to score")
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c - 1}], got range [{int(y.min())}, {int(y.max())}]")
    _check_finite_or_inf(logits, "logits")
    rank = torch.empty(n, dtype=torch.long)
    for start in range(0, n, chunk_size):
        rows = logits[start : start + chunk_size].float()
        own = y[start : start + rows.shape[0]].unsqueeze(1)
        ahead = rows >= rows.gather(1, own)
        ahead.scatter_(1, own, False)
        rank[start : start + rows.shape[0]] = ahead.sum(dim=1).cpu()
    return {f"top{k}": 100.0 * float((rank < min(k, c)).sum()) / n for k in ks}


def caption_retrieval_accuracy(
    emb1: torch.Tensor,
    emb2: torch.Tensor,
    texts1: Sequence[str] | None = None,
    texts2: Sequence[str] | None = None,
    chunk_size: int = _DEFAULT_CHUNK,
    extra_gallery: torch.Tensor | None = None,
    extra_texts: Sequence[str] | None = None,
) -> dict[str, float]:
    """Caption retrieval accuracy (CRA), the LLM2CLIP paper's text-only probe.

    For each image i, caption 1 (``emb1[i]``) is the query. The gallery is every caption
    of the split -- all rows of ``emb1`` and ``emb2`` plus ``extra_gallery`` (captions 3..5 of
    COCO: 5N - 1 candidates, the paper's protocol) -- except the query itself. A query is a hit
    if its top-1 by cosine similarity is ``emb2[i]``. Chance level is ~1 / (gallery size).

    Args:
        emb1: ``[N, D]`` first caption of each image (queries).
        emb2: ``[N, D]`` second caption of each image (the single correct answer).
        texts1, texts2: optional caption strings (length N each; give both or neither).
        extra_gallery: optional ``[M, D]`` further distractors (e.g. captions 3..5).
        extra_texts: strings of ``extra_gallery`` (needed for ``cra_lenient`` when given).

    Returns:
        ``{"cra": ..}`` in percent, strict (a distractor tied with ``emb2[i]`` counts
        as a miss). With texts, also ``"cra_lenient"``: a hit when every top-scoring
        gallery item has a string identical to ``texts2[i]`` (synthetic data repeats
        captions verbatim; identical strings are indistinguishable to any encoder).
        ``cra_lenient >= cra`` always. With ``extra_gallery``, also ``"cra_pairs"`` (and
        ``"cra_pairs_lenient"``): the same queries against captions 1-2 only (2N - 1 candidates,
        an easier number that is not the paper's).
    """
    if emb1.dim() != 2 or emb2.dim() != 2 or emb1.shape != emb2.shape:
        raise ValueError(f"emb1 and emb2 must both be [N, D] of equal shape, "
                         f"got {tuple(emb1.shape)} and {tuple(emb2.shape)}")
    n = emb1.shape[0]
    if n < 1:
        raise ValueError("CRA needs at least one caption pair")
    if (texts1 is None) != (texts2 is None):
        raise ValueError("give both texts1 and texts2, or neither")
    with_texts = texts1 is not None
    if with_texts and (len(texts1) != n or len(texts2) != n):
        raise ValueError(f"texts1/texts2 must have {n} entries each, got {len(texts1)} and {len(texts2)}")
    parts = [emb1.float(), emb2.float()]
    if extra_gallery is not None:
        if extra_gallery.dim() != 2 or extra_gallery.shape[1] != emb1.shape[1]:
            raise ValueError(f"extra_gallery must be [M, {emb1.shape[1]}], got {tuple(extra_gallery.shape)}")
        if with_texts and (extra_texts is None or len(extra_texts) != extra_gallery.shape[0]):
            raise ValueError("extra_texts must give one string per extra_gallery row when texts are given")
        parts.append(extra_gallery.float())
    gallery = torch.cat(parts)
    _check_finite_or_inf(gallery, "caption embeddings")
    norms = gallery.norm(dim=-1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a caption embedding has zero norm; cosine similarity is undefined")
    gallery = gallery / norms

    if with_texts:
        ids: dict[str, int] = {}
        all_texts = list(texts1) + list(texts2) + (list(extra_texts) if extra_gallery is not None else [])
        gid = torch.tensor([ids.setdefault(t, len(ids)) for t in all_texts], dtype=torch.long, device=gallery.device)

    # column limits: the whole gallery, and (with extras) captions 1-2 only
    limits = {"cra": gallery.shape[0]}
    if extra_gallery is not None:
        limits["cra_pairs"] = 2 * n
    strict = dict.fromkeys(limits, 0)
    lenient = dict.fromkeys(limits, 0)
    for start in range(0, n, chunk_size):
        q_idx = torch.arange(start, min(start + chunk_size, n), device=gallery.device)
        full = gallery[q_idx] @ gallery.t()  # [b, g]
        for name, cols in limits.items():
            scores = full[:, :cols]
            valid = torch.ones_like(scores, dtype=torch.bool)
            valid[torch.arange(len(q_idx)), q_idx] = False  # the query is not in its own gallery
            pos_col = (q_idx + n).unsqueeze(1)
            pos = scores.gather(1, pos_col)
            ahead = (scores >= pos) & valid
            ahead.scatter_(1, pos_col, False)
            strict[name] += int((ahead.sum(dim=1) == 0).sum())
            if with_texts:
                good = gid[:cols].unsqueeze(0) == gid[q_idx + n].unsqueeze(1)  # same string as the answer
                neg_inf = torch.full_like(scores, float("-inf"))
                best_good = torch.where(good & valid, scores, neg_inf).amax(dim=1)
                best_bad = torch.where(~good & valid, scores, neg_inf).amax(dim=1)
                lenient[name] += int((best_good > best_bad).sum())
    out = {}
    for name in limits:
        out[name] = 100.0 * strict[name] / n
        if with_texts:
            out[f"{name}_lenient"] = 100.0 * lenient[name] / n
    return out
