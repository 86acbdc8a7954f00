"""Metrics on hand-made similarity matrices and embeddings (CPU, < 2 s)."""

import pytest
import torch

from llm2clip.eval.metrics import (
    caption_retrieval_accuracy,
    retrieval_metrics,
    zeroshot_accuracy,
    zeroshot_classifier,
)


def _reference_retrieval(sim, t2i, ks):
    """Brute force by sorting (valid when there are no ties)."""
    n_img, n_txt = sim.shape
    out = {}
    order_i = sim.argsort(dim=1, descending=True)
    for k in ks:
        hits = sum(any(t2i[j] == i for j in order_i[i, :k].tolist()) for i in range(n_img))
        out[f"i2t_R@{k}"] = 100.0 * hits / n_img
    order_t = sim.t().argsort(dim=1, descending=True)
    for k in ks:
        hits = sum(int(t2i[j]) in order_t[j, :k].tolist() for j in range(n_txt))
        out[f"t2i_R@{k}"] = 100.0 * hits / n_txt
    return out


def test_constant_similarity_scores_zero_not_hundred():
    n_img, caps = 20, 5
    t2i = torch.arange(n_img).repeat_interleave(caps)
    sim = torch.zeros(n_img, n_img * caps)
    m = retrieval_metrics(sim, t2i)
    assert set(m) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"}
    assert all(v == 0.0 for v in m.values()), m


def test_perfect_and_percent_units():
    t2i = torch.tensor([0, 0, 1, 1, 2])
    sim = torch.full((3, 5), -1.0)
    sim[t2i, torch.arange(5)] = 1.0
    m = retrieval_metrics(sim, t2i, ks=(1,))
    assert m == {"i2t_R@1": 100.0, "t2i_R@1": 100.0}


def test_any_positive_counts_for_image_to_text():
    # image 0 has captions 0 and 1; only caption 1 is ranked first -> still a hit
    t2i = torch.tensor([0, 0, 1, 1])
    sim = torch.tensor([[0.1, 0.9, 0.5, 0.4],
                        [0.2, 0.3, 0.1, 0.8]])
    m = retrieval_metrics(sim, t2i, ks=(1, 2))
    assert m["i2t_R@1"] == 100.0
    # text 0 (image 0): column [0.1, 0.2] -> image 1 wins -> miss at 1, hit at 2
    # text 1: [0.9, 0.3] hit; text 2 (image 1): [0.5, 0.1] miss at 1; text 3: [0.4, 0.8] hit
    assert m["t2i_R@1"] == 50.0 and m["t2i_R@2"] == 100.0


def test_text_to_image_five_captions_per_image_matches_reference():
    g = torch.Generator().manual_seed(0)
    n_img = 30
    t2i = torch.arange(n_img).repeat_interleave(5)
    sim = torch.randn(n_img, n_img * 5, generator=g)
    sim[t2i, torch.arange(n_img * 5)] += 1.5  # signal, no exact ties with randn
    ks = (1, 5, 10)
    got = retrieval_metrics(sim, t2i, ks=ks, chunk_size=7)
    ref = _reference_retrieval(sim, t2i, ks)
    assert got == pytest.approx(ref)
    assert 0 < got["t2i_R@1"] < 100


def test_zeroshot_rank_boundary():
    scores = torch.tensor([[10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    assert zeroshot_accuracy(scores, torch.tensor([4]), ks=(5,))["top5"] == 100.0  # rank 5 counts
    assert zeroshot_accuracy(scores, torch.tensor([5]), ks=(5,))["top5"] == 0.0  # rank 6 does not


def test_image_to_text_rank_boundary():
    # one image row; its two captions sit at 1-based ranks r and r + 3 among 12 texts
    def i2t_at(r, k):
        scores = torch.arange(12, 0, -1, dtype=torch.float32)  # text j has rank j + 1
        t2i = torch.ones(12, dtype=torch.long)
        t2i[[r - 1, r + 2]] = 0
        sim = torch.stack([scores, -scores])  # image 1 only exists to own the other captions
        return retrieval_metrics(sim, t2i, ks=(k,))[f"i2t_R@{k}"]

    assert i2t_at(5, 5) == 100.0  # image 0 hit (its best caption at rank 5); image 1 hit
    assert i2t_at(6, 5) == 50.0
    assert i2t_at(1, 1) == 100.0
    assert i2t_at(2, 1) == 50.0


def test_retrieval_rank_boundary():
    # 12 images, 12 captions, caption j belongs to image j. Column 0 puts its image at rank r.
    def t2i_r_at(r, k):
        n = 12
        sim = torch.eye(n) * 100
        order = list(range(n))
        order.remove(0)
        order.insert(r - 1, 0)  # image 0 at position r - 1
        scores = torch.empty(n)
        for pos, img in enumerate(order):
            scores[img] = float(n - pos)
        sim[:, 0] = scores
        return retrieval_metrics(sim, torch.arange(n), ks=(k,))[f"t2i_R@{k}"]

    per_query = 100.0 / 12
    assert t2i_r_at(5, 5) == pytest.approx(100.0)  # rank 5 counts at k=5
    assert t2i_r_at(6, 5) == pytest.approx(100.0 - per_query)  # rank 6 does not
    assert t2i_r_at(10, 10) == pytest.approx(100.0)
    assert t2i_r_at(11, 10) == pytest.approx(100.0 - per_query)


def test_ties_are_pessimistic():
    # image 0's only caption ties with a caption of image 1 -> miss at k=1
    sim = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    m = retrieval_metrics(sim, torch.tensor([0, 1]), ks=(1, 2))
    assert m["i2t_R@1"] == 50.0 and m["i2t_R@2"] == 100.0
    # caption 1 ties between images 0 and 1 -> miss at k=1
    assert m["t2i_R@1"] == 50.0


def test_k_larger_than_gallery():
    sim = torch.tensor([[0.0, 1.0, 2.0], [5.0, 4.0, 3.0]])
    m = retrieval_metrics(sim, torch.tensor([0, 0, 1]), ks=(50,))
    assert m == {"i2t_R@50": 100.0, "t2i_R@50": 100.0}


def test_retrieval_input_errors():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(3, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.tensor([[float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(torch.zeros(2, 3), torch.tensor([0, 1]))


def test_retrieval_is_chunked_and_deterministic():
    g = torch.Generator().manual_seed(1)
    n_img = 400
    t2i = torch.arange(n_img).repeat_interleave(5)
    sim = torch.randn(n_img, n_img * 5, generator=g).half()  # low precision -> many ties
    a = retrieval_metrics(sim, t2i, chunk_size=13)
    b = retrieval_metrics(sim, t2i, chunk_size=1000)
    assert a == b


def test_zeroshot_classifier_normalises_each_template_before_averaging():
    feats = torch.tensor([[[10.0, 0.0], [0.0, 1.0]],   # class 0: norms differ a lot
                          [[0.0, -2.0], [0.0, -3.0]]])
    w = zeroshot_classifier(feats)
    s = 2 ** -0.5
    assert torch.allclose(w[0], torch.tensor([s, s]), atol=1e-6)  # plain mean would lean to x
    assert torch.allclose(w[1], torch.tensor([0.0, -1.0]))
    assert torch.allclose(w.norm(dim=1), torch.ones(2))
    # a list with a different number of templates per class
    w2 = zeroshot_classifier([feats[0], feats[1][:1]])
    assert torch.allclose(w2, w, atol=1e-6)


def test_zeroshot_accuracy_topk_clipping_and_ties():
    logits = torch.tensor([[3.0, 2.0, 1.0],
                           [1.0, 1.0, 0.0],    # tie between true class 0 and class 1
                           [0.0, 1.0, 2.0]])
    labels = torch.tensor([0, 0, 0])
    acc = zeroshot_accuracy(logits, labels, ks=(1, 2, 5))
    assert acc["top1"] == pytest.approx(100 / 3)  # the tie counts against sample 1
    assert acc["top2"] == pytest.approx(200 / 3)
    assert acc["top5"] == 100.0  # clipped to C = 3
    with pytest.raises(ValueError, match="labels"):
        zeroshot_accuracy(logits, torch.tensor([0, 1, 3]))


def test_zeroshot_end_to_end_with_template_averaging():
    g = torch.Generator().manual_seed(0)
    n_cls, n_tmpl, d = 4, 3, 16
    centres = torch.randn(n_cls, d, generator=g)
    text = centres[:, None, :] + 0.1 * torch.randn(n_cls, n_tmpl, d, generator=g)
    w = zeroshot_classifier(text)
    imgs = centres.repeat(5, 1) + 0.05 * torch.randn(20, d, generator=g)
    imgs = imgs / imgs.norm(dim=1, keepdim=True)
    acc = zeroshot_accuracy(100 * imgs @ w.t(), torch.arange(n_cls).repeat(5))
    assert acc == {"top1": 100.0, "top5": 100.0}


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True)


def test_cra_perfect_and_miss():
    emb1 = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    emb2 = _unit([1, 0.1, 0], [0, 1, 0.1], [0.1, 0, 1])
    assert caption_retrieval_accuracy(emb1, emb2) == {"cra": 100.0}
    # query 0's nearest neighbour becomes emb1[1] (another image's caption 1)
    emb1b = _unit([1, 0, 0], [1, 0.01, 0], [0, 0, 1])
    emb2b = _unit([0, 0, -1], [0, 1, 0], [0.1, 0, 1])
    r = caption_retrieval_accuracy(emb1b, emb2b)
    assert r["cra"] == pytest.approx(100 / 3)  # only query 2 hits


def test_cra_query_excluded_and_ties_pessimistic():
    # emb1[0] is its own nearest neighbour (score 1) but must not count; emb2[0] ties with emb1[1]
    emb1 = _unit([1, 0], [1, 0.5], [-1, 0])
    emb2 = _unit([1, 0.5], [0, 1], [-1, 0.2])
    r = caption_retrieval_accuracy(emb1, emb2)
    # query 0: emb2[0] == emb1[1] exactly -> tie -> miss; query 1: top is emb2[0] -> miss;
    # query 2: top is emb2[2] -> hit
    assert r["cra"] == pytest.approx(100 / 3)


def test_cra_lenient_counts_identical_strings():
    # captions of image 1 and image 0 are the same strings (synthetic data)
    emb1 = _unit([1, 0, 0], [1, 0, 0.001], [0, 0, 1])
    emb2 = _unit([0, 1, 0], [0, 1, 0.001], [0.1, 0, 1])
    texts1 = ["a red square", "a red square", "a blue circle"]
    texts2 = ["a big red square", "a big red square", "a small blue circle"]
    r = caption_retrieval_accuracy(emb1, emb2, texts1, texts2)
    # query 0: the top-1 is emb1[1] (same string as the query, not the answer) -> miss both
    # query 2: hit. Query 1: top is emb1[0] -> strict miss; lenient miss too (string differs)
    assert r["cra"] == pytest.approx(100 / 3)
    assert r["cra_lenient"] == pytest.approx(100 / 3)
    # make the answers identical strings and nearest: query 0 retrieves emb2[1] == texts2[0]
    emb2c = _unit([1, 0.2, 0], [1, 0.1, 0], [0.1, 0, 1])
    emb1c = _unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    r = caption_retrieval_accuracy(emb1c, emb2c, ["q0", "q1", "q2"], ["same", "same", "other"])
    # query 0 tops emb2[1] ("same", not its own row), query 1 tops emb2[0] ("same"), query 2 hits
    assert r["cra"] == pytest.approx(100 / 3)
    assert r["cra_lenient"] == 100.0


def test_cra_argument_errors_and_chance_level():
    with pytest.raises(ValueError, match="both"):
        caption_retrieval_accuracy(torch.ones(2, 3), torch.ones(2, 3), texts1=["a", "b"])
    g = torch.Generator().manual_seed(0)
    e1, e2 = torch.randn(300, 32, generator=g), torch.randn(300, 32, generator=g)
    assert caption_retrieval_accuracy(e1, e2, chunk_size=17)["cra"] < 3.0
    # extra gallery rows can only make it harder
    base = caption_retrieval_accuracy(e1, e1 + 0.5 * e2)["cra"]
    harder = caption_retrieval_accuracy(e1, e1 + 0.5 * e2, extra_gallery=e1 + 0.4 * torch.randn(300, 32, generator=g))
    assert harder["cra"] <= base
