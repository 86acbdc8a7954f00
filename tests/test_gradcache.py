"""GradCache (train.contrastive_chunk): the chunked loss and gradients equal the one-pass ones; dropout masks
are replayed; end to end (2 processes, ZeRO-2 and ZeRO-3) the logged loss and gradient norm match chunk 0 =
off."""
import pytest
import torch
from torch import nn

from llm2clip.gradcache import chunked_loss
from llm2clip.losses.clip import ClipLoss
from tests.helpers import read_metrics, torchrun
from tests.test_stage1_train import TRAIN as TRAIN1
from tests.test_stage1_train import stage1_args
from tests.test_stage2 import TRAIN as TRAIN2
from tests.test_stage2 import embedded, stage2_args  # noqa: F401 (fixture)

N, CHUNK = 12, 4


class Tower(nn.Module):
    def __init__(self, p_drop: float):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(p_drop), nn.Linear(16, 6))
        self.txt = nn.Sequential(nn.Linear(5, 16), nn.Dropout(p_drop), nn.Linear(16, 6))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        f = nn.functional.normalize
        return f(self.img(x), dim=-1), f(self.txt(t), dim=-1), self.logit_scale.exp()


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _run(p_drop: float, chunk: int, graph_chunks: bool = False):
    """(loss, grads) for one batch; chunk=0: one pass; graph_chunks: the chunks run with a graph, in the
    order GradCache's first pass draws its dropout masks (the reference when dropout is on)."""
    torch.manual_seed(0)
    model = Tower(p_drop)
    x, t = torch.randn(N, 8, dtype=torch.float64), torch.randn(N, 5, dtype=torch.float64)
    model.double()
    loss_fn = ClipLoss()
    torch.manual_seed(1)
    if chunk == 0:
        loss = loss_fn(*model(x, t))
    elif graph_chunks:
        per = [model(x[i:i + chunk], t[i:i + chunk]) for i in range(0, N, chunk)]
        loss = loss_fn(torch.cat([o[0] for o in per]), torch.cat([o[1] for o in per]), per[0][2])
    else:
        loss, _ = chunked_loss(model, N, chunk, lambda i, j, fwd: fwd(x[i:j], t[i:j]),
                               lambda per: (loss_fn(torch.cat([o[0] for o in per]), torch.cat([o[1] for o in per]),
                                                    per[0][2]), {}))
    (loss * 0.5).backward()  # the engine's 1/grad_accum reaches the parameters through the surrogate
    return float(loss), _grads(model), torch.rand(1)  # the RNG after the step


def test_chunked_equals_one_pass():
    loss0, g0, _ = _run(0.0, 0)
    for chunk in (1, 4, 5):  # 5 leaves a short last chunk
        loss, g, _ = _run(0.0, chunk)
        assert abs(loss - loss0) < 1e-10
        for a, b in zip(g, g0):
            assert torch.allclose(a, b, atol=1e-10), (chunk, (a - b).abs().max())


def test_dropout_masks_are_replayed():
    ref_loss, ref, ref_rng = _run(0.3, CHUNK, graph_chunks=True)
    loss, g, rng = _run(0.3, CHUNK)
    assert abs(loss - ref_loss) < 1e-10
    for a, b in zip(g, ref):
        assert torch.allclose(a, b, atol=1e-10), (a - b).abs().max()
    assert torch.equal(rng, ref_rng)  # the RNG goes on as after the first pass
    # the check can fail: dropout is on, so another draw of masks gives other gradients
    _, g_one_pass, _ = _run(0.3, 0)
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(g_one_pass, ref))


def test_chunk_must_divide_micro_batch():
    from llm2clip.config import ConfigError
    from llm2clip.schema import Stage1TrainConfig

    with pytest.raises(ConfigError, match=r"train\.contrastive_chunk=5 must be 0 \(off\) or divide "
                                          r"train\.micro_batch_size=16; pick a divisor such as 4"):
        Stage1TrainConfig(micro_batch_size=16, contrastive_chunk=5).validate()
    Stage1TrainConfig(micro_batch_size=16, contrastive_chunk=4).validate()


def _steps(out) -> list[tuple[float, float]]:
    return [(m["train/loss"], m["train/grad_norm"]) for m in read_metrics(out) if "train/loss" in m]


def _same(a, b):
    assert len(a) == len(b) == 2, (a, b)
    for (la, ga), (lb, gb) in zip(a, b):  # step 2's loss also checks that step 1's update was the same
        assert abs(la - lb) < 1e-5 and abs(ga - gb) < 1e-5 * max(1.0, gb), (a, b)


@pytest.mark.slow
def test_stage1_lora_chunked_two_process(tiny_world, tmp_path):
    """2 ranks, LoRA, fp32: chunks of 4 give the one-pass loss and gradient norm at every step (the negatives
    span both ranks' chunks): under ZeRO-2 (train.strategy=replicated) with and without gradient checkpointing
    (non-reentrant when chunked), and under ZeRO-3 (train.strategy=zero3, per-chunk engine.backward) with
    reentrant checkpointing, as an 8B run would use it."""
    common = ["--set", "train.max_steps=2", "--set", "train.eval_every=0", "--set", "train.save_every=0",
              "--set", "data.val_path=", "--set", "train.micro_batch_size=8", "--set", "train.precision=fp32",
              "--set", "lora.dropout=0.0"]
    runs = {}
    for strategy, chunk, ckpt in (("replicated", 0, "false"), ("replicated", 4, "false"),
                                  ("replicated", 4, "true"), ("zero3", 0, "false"), ("zero3", 4, "true")):
        out = tmp_path / f"{strategy}{chunk}{ckpt}"
        torchrun(TRAIN1, stage1_args(tiny_world, out, *common, "--set", f"train.strategy={strategy}",
                                     "--set", f"train.contrastive_chunk={chunk}",
                                     "--set", f"text.gradient_checkpointing={ckpt}"), timeout=300)
        runs[strategy, chunk, ckpt] = _steps(out)
    _same(runs["replicated", 0, "false"], runs["replicated", 4, "false"])
    _same(runs["replicated", 0, "false"], runs["replicated", 4, "true"])
    _same(runs["zero3", 0, "false"], runs["zero3", 4, "true"])


@pytest.mark.slow
def test_stage2_tower_adapter_chunked_two_process(tiny_world, embedded, tmp_path):  # noqa: F811
    """2 ranks, tower + adapter, fp32: chunks of 4 give the one-pass loss and gradient norm, under ZeRO-1 and
    ZeRO-3. With adapter
    dropout on, one chunk of the whole micro-batch must too: its re-run draws the first pass's masks, which
    are the one-pass masks (without the RNG replay the re-run's gradient would belong to other masks)."""
    common = ["--set", "train.max_steps=2", "--set", "train.eval_every=0", "--set", "train.save_every=0",
              "--set", "data.val_shards=", "--set", "train.micro_batch_size=8", "--set", "train.precision=fp32",
              "--set", "data.num_workers=0"]
    runs = {}
    for drop, chunk, zero in ((0.0, 0, 1), (0.0, 4, 1), (0.2, 0, 1), (0.2, 8, 1), (0.0, 0, 3), (0.0, 4, 3)):
        out = tmp_path / f"d{drop}c{chunk}z{zero}"
        torchrun(TRAIN2, stage2_args(tiny_world, embedded, out, *common, "--set", f"model.adapter_dropout={drop}",
                                     "--set", f"train.contrastive_chunk={chunk}", "--set", f"train.zero_stage={zero}"),
                 timeout=300)
        runs[drop, chunk, zero] = _steps(out)
    _same(runs[0.0, 0, 1], runs[0.0, 4, 1])
    _same(runs[0.2, 0, 1], runs[0.2, 8, 1])
    _same(runs[0.0, 0, 3], runs[0.0, 4, 3])
    assert runs[0.2, 0, 1] != runs[0.0, 0, 1]  # the dropout is on
