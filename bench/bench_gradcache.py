#!/usr/bin/env python
"""Peak activation memory and step time of a stage-1 step vs train.contrastive_chunk (GradCache), CPU, fp32.

    python bench/bench_gradcache.py --batch 64 --chunks 0 32 16 8 4

A random Llama (hidden 256, 4 layers, LoRA r16 on q/k/v/o, dropout 0.05) embeds batch x (query,
positive, negative) texts of --length tokens, mean-pooled, InfoNCE with hard negatives: the stage-1
loss. chunk 0 is the one-pass step (the bare baseline, same run). Peak activations = the most bytes
held at once by tensors autograd saved for backward (torch.autograd.graph.saved_tensors_hooks; each
storage counted once while any saved reference to it lives; parameters excluded). Also checks that
every chunked step's loss and gradients equal the one-pass ones (dropout off for that check).
"""
import argparse
import sys
import time
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class SavedBytes:
    """Live and peak bytes of the distinct storages autograd holds for backward."""

    def __init__(self):
        self.live, self.peak, self.refs = 0, 0, {}

    def _release(self, key, nbytes):
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= nbytes

    def pack(self, t):
        if isinstance(t, torch.nn.Parameter):
            return t
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if key not in self.refs:
            self.refs[key] = 0
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        box = _Box(t)
        weakref.finalize(box, self._release, key, nbytes)
        return box

    @staticmethod
    def unpack(x):
        return x.t if isinstance(x, _Box) else x


class _Box:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def build(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    base = LlamaModel(cfg)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, bias="none",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))


def step(model, ids, chunk: int, meter: SavedBytes | None):
    """One stage-1 loss + backward; returns (loss, grads)."""
    from llm2clip.gradcache import chunked_loss
    from llm2clip.losses.infonce import infonce_loss

    n = ids.shape[1]
    model.zero_grad(set_to_none=True)

    def embed(i, j, fwd):  # (query, positive, negative) of examples [i, j) in one forward
        x = ids[:, i:j].reshape(-1, ids.shape[-1])
        h = fwd(input_ids=x).last_hidden_state.mean(1)
        return tuple(h.view(3, j - i, -1))

    def loss_of(per):
        q, p, neg = (torch.cat(x) for x in zip(*per))
        return infonce_loss(q, p, neg, 0.05)

    ctx = torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack) if meter else _null()
    with ctx:
        if chunk:
            loss, _ = chunked_loss(model, n, chunk, embed, loss_of)
        else:
            loss, _ = loss_of([embed(0, n, model)])
        loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 16, 8, 4])
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (3, a.batch, a.length), generator=g)

    # exactness (dropout off): every chunk size gives the one-pass loss and gradients
    model = build(0.0)
    ref_loss, ref = step(model, ids, 0, None)
    for c in a.chunks:
        if c:
            loss, grads = step(model, ids, c, None)
            err = max(float((x - y).abs().max()) for x, y in zip(grads, ref))
            assert abs(loss - ref_loss) < 1e-5 and err < 1e-5, (c, loss, ref_loss, err)
    print(f"exact: every chunk size matches the one-pass loss {ref_loss:.6f} and gradients within 1e-5")

    model = build(0.05)
    rows = []
    for c in a.chunks:
        meter = SavedBytes()
        step(model, ids, c, meter)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            step(model, ids, c, None)
            times.append(time.perf_counter() - t0)
        rows.append((c, meter.peak, min(times)))
    base_peak, base_t = rows[0][1], rows[0][2]
    print(f"batch {a.batch} x 3 texts x {a.length} tokens, {torch.get_num_threads()} threads")
    print(f"{'chunk':>6} {'peak saved MiB':>15} {'vs one pass':>12} {'step s':>8} {'vs one pass':>12}")
    for c, peak, t in rows:
        print(f"{c or 'off':>6} {peak / 2**20:>15.1f} {peak / base_peak:>12.3f} {t:>8.2f} {t / base_t:>12.2f}")


if __name__ == "__main__":
    main()
