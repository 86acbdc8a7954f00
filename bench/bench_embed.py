#!/usr/bin/env python
"""Caption embedding throughput, side by side on the same captions and model (interleaved repeats,
medians): naive fixed-size batches in file order (what a straightforward loop over the shard does),
token-budget batches of length-sorted captions (padded), and packed rows (text.packing: several
captions per row, block-diagonal attention, no padding). All three run through the TextEmbedder.

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
from llm2clip.text.batching import EncodeStats, plan_fixed  # noqa: E402
from llm2clip.text.embedder import TextEmbedder  # noqa: E402


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


def run(emb: TextEmbedder, shards: list[list[str]], device) -> tuple[dict, list[torch.Tensor]]:
    stats = EncodeStats()
    outs = []
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for caps in shards:  # one window per shard, as the embed step does
        out, st = emb.embed_encoded(emb.encode(caps))  # tokenising is part of the cost
        outs.append(out)
        stats.add(st)
    if device.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    d = stats.as_dict()
    d.update(seconds=round(sec, 3), captions_per_s=round(stats.captions / sec, 1),
             tokens_per_s=round(stats.tokens / sec, 1))
    return d, outs


def embedders(enc, ptok, cfg: TextEncoderConfig, a) -> dict[str, TextEmbedder]:
    """The three batchings over one loaded model."""
    out = {}
    for name, packing in (("naive", False), ("token_budget", False), ("packed", True)):
        e = TextEmbedder(cfg, enc.backbone.device, a.token_budget, a.max_batch_size, encoder=enc, ptok=ptok)
        e._packing = packing
        if name == "naive":
            e.plan = lambda lengths: plan_fixed(len(lengths), a.batch_size)  # file order, fixed size
        out[name] = e
    return out


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
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings per method (median reported)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
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
    from llm2clip.text.encoder import build_text_encoder, resolve_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = TextEncoderConfig(model_path=model, attn_implementation=a.attn, max_length=a.max_length, pad_token="eos")
    enc, ptok = build_text_encoder(cfg, dtype=resolve_dtype(cfg.dtype))
    enc = enc.to(device).eval().requires_grad_(False)
    shards = load_captions(data, a.fields.split(","), a.samples)
    methods = embedders(enc, ptok, cfg, a)
    for e in methods.values():
        run(e, [shards[0][:64]], device)  # warm-up
    times: dict[str, list[dict]] = {k: [] for k in methods}
    outs: dict[str, list[torch.Tensor]] = {}
    for _ in range(a.repeats):  # interleaved, so drift in the machine's load hits every method alike
        for name, e in methods.items():
            st, outs[name] = run(e, shards, device)
            times[name].append(st)
    res = {k: sorted(v, key=lambda st: st["seconds"])[len(v) // 2] for k, v in times.items()}  # median run
    diff = max(float((x - y).abs().max()) for k in ("token_budget", "packed") for x, y in zip(outs["naive"], outs[k]))
    cpu = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"
    base = res["naive"]["captions_per_s"]
    rec = {"device": torch.cuda.get_device_name() if device.type == "cuda" else cpu,
           "model": model if a.model else f"random llama hidden={a.hidden} layers={a.layers}",
           "dtype": str(next(enc.parameters()).dtype), "attn": a.attn, "fields": a.fields,
           "naive_batch_size": a.batch_size, "token_budget": a.token_budget, "repeats": a.repeats, **res,
           "speedup_vs_naive": {k: round(v["captions_per_s"] / base, 2) for k, v in res.items()},
           "max_abs_diff": diff}
    print(json.dumps(rec, indent=1))
    cmd = f"`python bench/bench_embed.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}`"
    for k, v in res.items():
        print(f"| embed, {k} | {rec['device']} | {rec['model']}, {a.attn} | {v['captions']} captions | "
              f"{v['captions_per_s']:.0f} cap/s | {v['tokens_per_s']:,.0f} tok/s | pad {v['padding_fraction']:.1%} | "
              f"x{rec['speedup_vs_naive'][k]} | {cmd} |")
    tmp.cleanup()
    return rec


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
