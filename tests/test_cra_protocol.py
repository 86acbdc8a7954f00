"""CRA by the paper's protocol: the gallery is every caption of the split (5N - 1 on COCO), captions 1-2
only (2N - 1) reported beside it as cra_pairs; stage 1's in-loop CRA and tools/eval_zero_shot.py's read
the same captions and score them with the same function."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from llm2clip.eval.metrics import caption_retrieval_accuracy


def test_full_gallery_is_harder_than_pairs_only():
    n, d = 3, 4
    e1 = torch.eye(d)[:n]
    e2 = e1 + 0.3 * torch.eye(d)[[1, 2, 0]]  # each answer is close to its query
    extra = e1.clone()  # caption 3 of each image: identical direction to the query -> beats the answer
    r = caption_retrieval_accuracy(e1, e2, extra_gallery=extra)
    assert r["cra_pairs"] == 100.0 and r["cra"] == 0.0
    assert caption_retrieval_accuracy(e1, e2) == {"cra": 100.0}  # no extras: the gallery is captions 1-2


def test_chance_level_follows_the_gallery_size():
    g = torch.Generator().manual_seed(0)
    n = 400
    e1, e2, ex = (torch.randn(n, 8, generator=g) for _ in range(3))
    r = caption_retrieval_accuracy(e1, e2, extra_gallery=torch.cat([ex, torch.randn(2 * n, 8, generator=g)]))
    assert r["cra"] <= r["cra_pairs"]


def _shards(tmp_path, n=12):
    path = tmp_path / "val-000000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            meta = {"short_alt": f"alt {i}", "dense": f"dense {i}", "dense_alt": f"dense alt {i}"}
            for name, data in ((f"k{i:03d}.txt", f"short {i}"), (f"k{i:03d}.json", json.dumps(meta))):
                b = data.encode()
                info = tarfile.TarInfo(name)
                info.size = len(b)
                tar.addfile(info, io.BytesIO(b))
    return str(path)


def test_stage1_in_loop_and_eval_read_the_same_gallery(tmp_path):
    from llm2clip.data.pairs import load_caption_pairs
    from llm2clip.schema_eval import EvalCRAConfig
    from llm2clip.tasks.evaluate import read_cra

    fields = ["txt", "json:short_alt", "json:dense", "json:dense_alt"]
    shards = _shards(tmp_path)
    _, c1, c2, more = load_caption_pairs(shards, fields, 1000)  # stage 1's val set
    ev = read_cra("val", EvalCRAConfig(kind="shards", path=shards, fields=fields))
    assert (ev.texts1, ev.texts2, ev.extra) == (c1, c2, more) and len(more) == 2 * len(c1)
    # the same function on the same gallery gives the same number; the gallery holds 4N - 1 candidates
    table = {t: torch.randn(6, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in c1 + c2 + more}
    emb = [torch.stack([table[t] for t in ts]) for ts in (c1, c2, more)]
    a = caption_retrieval_accuracy(emb[0], emb[1], c1, c2, extra_gallery=emb[2], extra_texts=more)
    b = caption_retrieval_accuracy(emb[0], emb[1], ev.texts1, ev.texts2, extra_gallery=emb[2], extra_texts=ev.extra)
    assert a == b and set(a) == {"cra", "cra_lenient", "cra_pairs", "cra_pairs_lenient"}


def test_karpathy_cra_uses_every_sentence(tmp_path):
    from llm2clip.schema_eval import EvalCRAConfig
    from llm2clip.tasks.evaluate import read_cra

    images = [{"split": "test", "sentences": [{"raw": f"img {i} cap {j}"} for j in range(5)]} for i in range(3)]
    p = tmp_path / "k.json"
    p.write_text(json.dumps({"images": images}))
    ev = read_cra("coco", EvalCRAConfig(kind="karpathy", path=str(p)))
    assert len(ev.texts1) == 3 and len(ev.extra) == 9  # gallery 5N - 1 = 14 per query
    assert ev.extra[:3] == ["img 0 cap 2", "img 0 cap 3", "img 0 cap 4"]
    with pytest.raises(Exception, match="query and the answer"):
        EvalCRAConfig(kind="shards", path="x", fields=["txt"]).validate()
