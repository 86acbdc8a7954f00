#!/usr/bin/env python
"""Caption embedding throughput: token-budget batches of length-sorted captions vs naive fixed-size
batches in file order (what a straightforward loop over the shard does). Same captions, same model.

    python bench/bench_embed.py                       # synthetic data + a small random Llama, CPU
    python bench/bench_embed.py --data 'runs/tiny/data/train/shard-*.tar' --model runs/tiny/models/tiny-llama
    python bench/bench_embed.py --model /models/llama3-8b-cc --fields txt,json:dense --token-budget 65536  # GPU

Prints a JSON record and a one-line summary for docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm2clip.data.shards import expand_shards, get_caption, iter_tar_samples  # noqa: E402
from llm2clip.schema import TextEncoderConfig  # noqa: E402
from llm2clip.text.feature_cache import encode_bucketed, fixed_batches, plan_batches  # noqa: E402


def load_captions(spec: str, fields: list[str], limit: int) -> list[list[str]]:
    """Captions per shard, fields interleaved per sample (file order)."""
    out = []
    n = 0
    for shard in expand_shards(spec):
        caps = []
        for s in iter_tar_samples(shard, want={"txt", "json"}):
            caps += [c for c in (get_caption(s, f) for f in fields) if c]
            n += 1
            if n >= limit:
                break
        out.append(caps)
        if n >= limit:
            break
    return out


def run(enc, ptok, shards: list[list[str]], plan, device) -> tuple[dict, list[torch.Tensor]]:
    stats = {"captions": 0, "tokens": 0, "padded_tokens": 0, "batches": 0}
    outs = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for caps in shards:
        encoded = [ptok.encode_one(c) for c in caps]  # tokenising is part of the cost
        out, st = encode_bucketed(enc, encoded, ptok.tok.pad_token_id, ptok.tok.padding_side, plan(encoded), device)
        outs.append(out)
        for k in stats:
            stats[k] += getattr(st, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    stats.update(seconds=round(sec, 3), captions_per_s=round(stats["captions"] / sec, 1),
                 tokens_per_s=round(stats["tokens"] / sec, 1),
                 padding_fraction=round(1 - stats["tokens"] / stats["padded_tokens"], 4))
    return stats, outs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="", help="image shard spec; default: synthetic data in a temp dir")
    ap.add_argument("--model", default="", help="local HF model folder; default: a random Llama (--hidden/--layers)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--fields", default="txt,json:short_alt,json:dense,json:dense_alt")
    ap.add_argument("--samples", type=int, default=1000, help="image samples to read (x fields = captions)")
    ap.add_argument("--batch-size", type=int, default=64, help="naive fixed batch size")
    ap.add_argument("--token-budget", type=int, default=8192)
    ap.add_argument("--max-batch-size", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings per method")
    a = ap.parse_args(argv)
    from llm2clip.logger import setup_logging

    setup_logging()  # silences transformers' load reports
    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory(prefix="bench_embed_")
    data, model = a.data, a.model
    if not data or not model:
        from llm2clip.data.synthetic import generate
        from llm2clip.testing.tiny_models import make_tiny_llm

        root = Path(tmp.name)
        generate(root / "data", n_train=a.samples, n_val=0, seed=0, image_size=32, shard_size=500, cls_per_class=0)
        data = data or str(root / "data" / "train" / "shard-*.tar")
        model = model or str(make_tiny_llm(root / "llm", root / "data" / "tokenizer", hidden=a.hidden,
                                           layers=a.layers, heads=4, kv_heads=2, intermediate=a.hidden * 2))
    from llm2clip.text.encoder import build_text_encoder

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    enc, ptok = build_text_encoder(TextEncoderConfig(model_path=model, attn_implementation="sdpa",
                                                     max_length=a.max_length, pad_token="eos"))
    enc = enc.to(device).eval().requires_grad_(False)
    shards = load_captions(data, a.fields.split(","), a.samples)
    naive_plan = lambda enc_: fixed_batches(len(enc_), a.batch_size)  # noqa: E731
    budget_plan = lambda enc_: plan_batches([len(e[0]) for e in enc_], a.token_budget, a.max_batch_size)  # noqa: E731
    run(enc, ptok, [shards[0][:64]], naive_plan, device)  # warm-up
    results = {}
    for name, plan in (("naive", naive_plan), ("token_budget", budget_plan)):
        best, outs = None, None
        for _ in range(a.repeats):
            st, o = run(enc, ptok, shards, plan, device)
            if best is None or st["seconds"] < best["seconds"]:
                best, outs = st, o
        results[name] = (best, outs)
    diff = max(float((x - y).abs().max()) for x, y in zip(results["naive"][1], results["token_budget"][1]))
    naive, budget = results["naive"][0], results["token_budget"][0]
    cpu = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    rec = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu,
           "model": model if a.model else f"random llama hidden={a.hidden} layers={a.layers}",
           "dtype": str(next(enc.parameters()).dtype), "fields": a.fields, "naive_batch_size": a.batch_size,
           "token_budget": a.token_budget, "naive": naive, "token_budget_batches": budget,
           "speedup": round(budget["captions_per_s"] / naive["captions_per_s"], 2), "max_abs_diff": diff}
    print(json.dumps(rec, indent=1))
    print(f"| embed captions | {rec['device']} | {rec['model']} | {naive['captions']} captions | "
          f"naive bs={a.batch_size}: {naive['captions_per_s']:.0f} cap/s, pad {naive['padding_fraction']:.1%} | "
          f"token budget {a.token_budget}: {budget['captions_per_s']:.0f} cap/s, pad {budget['padding_fraction']:.1%} | "
          f"x{rec['speedup']} | `python bench/bench_embed.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` |")
    tmp.cleanup()
    return rec


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
