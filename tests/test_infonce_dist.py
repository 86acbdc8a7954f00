"""The stage-1 loss over 2 ranks (gather-with-grad, local loss) equals the single-process global loss."""
import json

import torch

from llm2clip.losses.infonce import infonce_loss, text_ids
from tests.helpers import ROOT, torchrun


def test_distributed_infonce_matches_single_process(tmp_path):
    torchrun(str(ROOT / "tests/dist_scripts/infonce_equiv.py"), [str(tmp_path)], timeout=120)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    torch.manual_seed(0)
    N, d = 8, 6
    x = torch.randn(3 * N, d)
    lin = torch.nn.Linear(d, d)
    texts = [f"t{i % 5}" for i in range(N)]
    negs = [f"n{i % 3}" for i in range(N)]
    q, p, n = [x[k * N:(k + 1) * N].clone().requires_grad_(True) for k in range(3)]
    loss, _ = infonce_loss(lin(q), lin(p), lin(n), 0.05, text_ids(texts), text_ids(negs))
    loss.backward()
    # loss: the size-weighted mean of local losses is the global loss
    dist_loss = sum(ri["loss"] * ri["n_local"] for ri in r) / N
    assert abs(dist_loss - float(loss)) < 1e-5
    g_single = torch.cat([p_.grad.flatten() for p_ in lin.parameters()])
    for ri in r:
        assert torch.allclose(torch.tensor(ri["lin_grad"]), g_single, atol=1e-5)
    # per-row input gradients, concatenated in rank order, equal the global ones (each rank's
    # objective carries the factor `world` that the data-parallel average divides out)
    for key, ref in (("q_grad", q.grad), ("p_grad", p.grad), ("n_grad", n.grad)):
        got = torch.cat([torch.tensor(ri[key]) for ri in r]) / 2
        assert torch.allclose(got, ref, atol=1e-5), key


def test_identical_captions_are_not_negatives():
    torch.manual_seed(0)
    q = torch.randn(4, 8)
    p = q.clone()
    p[1] = q[0] * 0.1  # row 1's positive looks like query 0's positive...
    ids = text_ids(["a", "a", "b", "c"])  # ...and its text is the same as row 0's positive
    masked, _ = infonce_loss(q, p, None, 0.05, ids)
    unmasked, _ = infonce_loss(q, p, None, 0.05, None)
    assert masked < unmasked
