#!/usr/bin/env python
"""Training-step throughput, MFU and peak memory for real model shapes (random weights, no download).

    python bench/bench_train_step.py stage1 --shape llama3-8b --batch 64 --seq 128        # on a GPU
    python bench/bench_train_step.py stage1 --shape tiny --batch 32 --seq 64               # anywhere
    python bench/bench_train_step.py stage2 --shape vit-l14-336 --batch 256                # on a GPU

stage1: bidirectional LLM + LoRA (r16, all linear layers), mean pooling, InfoNCE over the batch.
  FLOPs/token = 4 N (forward 2N + activation gradients 2N; the frozen base has no weight gradients;
  recompute not counted), N = non-embedding parameters.
stage1-mix: the stage-1 step on the tiny demo's real caption mix (synthetic shards: short queries with
  the query instruction, long dense positives and hard negatives, via PairStream), side by side in one
  run (interleaved repeats, medians): padded to the longest caption of the micro-batch (before packing),
  token-budget buckets (length-sorted sub-batches, each padded to its own longest), packed rows
  (text.packing). Reports real (non-pad) tokens/s and the pad fraction.
stage2: CLIP vision tower + projection + 4-block adapter on random "LLM embeddings", CLIP loss.
  FLOPs/image = 6 N_tower x tokens-per-image (forward + both gradients; all trained).
MFU = achieved FLOP/s / --peak-tflops (default: 989 for a bf16 H100/H200 dense, none on CPU).
Prints one markdown row for docs/PERFORMANCE.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLM_SHAPES = {  # from the public config.json of each model
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "mistral-nemo-12b": dict(hidden_size=5120, intermediate_size=14336, num_hidden_layers=40, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=131072),
}
VIT_SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, image_size=64,
                 patch_size=8),
    "vit-b16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
    "vit-l14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                        image_size=336, patch_size=14),
}


def device_and_dtype(args):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    return dev, dtype


def timed(step, warmup: int, iters: int, dev) -> float:
    for _ in range(warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def bench_stage1(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel, MistralConfig, MistralModel

    from llm2clip.losses.infonce import infonce_loss
    from llm2clip.text.encoder import resolve_attn_implementation
    from llm2clip.text.tokenize import TextBatch
    from llm2clip.text.encoder import pool

    dev, dtype = device_and_dtype(args)
    shape = LLM_SHAPES[args.shape]
    cls_cfg, cls_model = (MistralConfig, MistralModel) if "mistral" in args.shape else (LlamaConfig, LlamaModel)
    cfg = cls_cfg(**shape, is_causal=False)
    attn = resolve_attn_implementation("auto") if dev.type == "cuda" else "sdpa"
    with torch.device(dev):
        model = cls_model._from_config(cfg, attn_implementation=attn, dtype=dtype)
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    n_nonemb = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    B, T = args.batch, args.seq
    ids = torch.randint(0, shape["vocab_size"], (2 * B, T), device=dev)
    mask = torch.ones_like(ids)

    def step():
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        e = pool(h, TextBatch(ids, mask, mask), "mean")
        loss, _ = infonce_loss(e[:B], e[B:], None, 0.02)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, args.warmup, args.iters, dev)
    tokens = 2 * B * T
    flops = 4 * n_nonemb * tokens
    return report(args, dev, dtype, f"{args.shape} LoRA r16 bidir, {2 * B}x{T} tok/step, attn={attn}",
                  f"{tokens / dt:,.0f} tokens/s", flops / dt, dt)


def bench_stage1_mix(args):
    """Returns {method: {"step_s", "real_tokens_per_s", "pad_fraction", "loss"}} and prints a table."""
    import statistics
    import tempfile
    from pathlib import Path

    from peft import LoraConfig, get_peft_model

    from llm2clip.data.pairs import PairStream
    from llm2clip.data.synthetic import generate
    from llm2clip.losses.infonce import infonce_loss
    from llm2clip.schema import PairSourceConfig, Stage1DataConfig, TextEncoderConfig
    from llm2clip.testing.tiny_models import make_tiny_llm
    from llm2clip.text.batching import plan_padded
    from llm2clip.text.embedder import TextEmbedder, layout
    from llm2clip.text.encoder import TextEncoder, build_text_encoder

    dev, dtype = device_and_dtype(args)
    tmp = tempfile.TemporaryDirectory(prefix="bench_stage1_")
    root = Path(tmp.name)
    generate(root / "data", n_train=args.samples, n_val=0, seed=0, image_size=32, shard_size=500, cls_per_class=0)
    model_dir = make_tiny_llm(root / "llm", root / "data" / "tokenizer", hidden=args.hidden, layers=args.layers,
                              heads=4, kv_heads=2, intermediate=2 * args.hidden)
    data = Stage1DataConfig(sources=[PairSourceConfig(path=str(root / "data/train/shard-*.tar"))])
    batches = []
    stream = iter(PairStream(data, args.batch, 0, 0, 1))
    for _ in range(args.iters):
        batches.append(next(stream))
    methods = {}
    for name in ("padded", "buckets", "packed"):
        cfg = TextEncoderConfig(model_path=str(model_dir), attn_implementation="sdpa", max_length=args.seq,
                                packing="on" if name == "packed" else "off")
        enc, ptok = build_text_encoder(cfg, dtype=dtype)
        torch.manual_seed(0)
        backbone = get_peft_model(enc.backbone, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model = TextEncoder(backbone).to(dev)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        methods[name] = (model, TextEmbedder(cfg, dev, encoder=model, ptok=ptok), opt)

    def step(name, batch):
        model, emb, opt = methods[name]
        examples, _ = batch
        n = len(examples)
        texts = [e.query for e in examples] + [e.positive for e in examples] + [e.negative for e in examples]
        instr = [data.query_instruction] * n + [data.doc_instruction] * 2 * n
        if name == "buckets":  # length-sorted sub-batches under a token budget, each padded to its own longest
            encoded = emb.encode(texts, instr)
            outs, order, real, slots = [], [], 0, 0
            for b in plan_padded([len(e[0]) for e in encoded], args.token_budget, 10 ** 6):
                tb, o = layout(encoded, b, ptok.tok.pad_token_id, ptok.tok.padding_side, False)
                tb = tb.to(dev)
                outs.append(model.encode(tb))
                order += o
                real, slots = real + tb.n_tokens, slots + tb.n_slots
            e = torch.empty(len(order), outs[0].shape[1], device=dev)
            e = e.index_copy(0, torch.tensor(order, device=dev), torch.cat(outs))
        else:
            tb, inv = emb.train_batch(texts, instr)
            tb = tb.to(dev)
            e = model.encode(tb)[inv.to(dev)]
            real, slots = tb.n_tokens, tb.n_slots
        loss, _ = infonce_loss(e[:n], e[n:2 * n], e[2 * n:], 0.05)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), real, slots

    for name in methods:  # warm-up
        step(name, batches[0])
    rec = {k: {"times": [], "real": 0, "slots": 0, "losses": []} for k in methods}
    for _ in range(args.repeats):  # interleaved: machine noise hits every method alike
        for name in methods:
            for b in batches:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                loss, real, slots = step(name, b)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                r = rec[name]
                r["times"].append(time.perf_counter() - t0)
                r["real"] += real
                r["slots"] += slots
                r["losses"].append(loss)
    out = {}
    for name, r in rec.items():
        med = statistics.median(r["times"])
        real_per_step = r["real"] / len(r["times"])
        out[name] = {"step_s": round(med, 4), "real_tokens_per_s": round(real_per_step / med, 1),
                     "pad_fraction": round(1 - r["real"] / r["slots"], 4)}
    base = out["padded"]["real_tokens_per_s"]
    machine = torch.cuda.get_device_name() if dev.type == "cuda" else \
        f"CPU {platform.machine()} x{torch.get_num_threads()} threads"
    for name, o in out.items():
        o["speedup"] = round(o["real_tokens_per_s"] / base, 2)
        print(f"| stage1 step, {name} | {machine} | demo caption mix, llama hidden {args.hidden} x{args.layers}, "
              f"LoRA r16, {args.batch} pairs + hard negatives, {str(dtype).replace('torch.', '')} | "
              f"{o['real_tokens_per_s']:,.0f} real tok/s | pad {o['pad_fraction']:.1%} | {o['step_s'] * 1000:.0f} ms/step | "
              f"x{o['speedup']} | `python bench/bench_train_step.py {' '.join(sys.argv[1:])}` |")
    # same data, same init: the first step's loss must agree across methods
    first = {k: r["losses"][0] for k, r in rec.items()}
    assert max(first.values()) - min(first.values()) < 1e-3 * max(1.0, abs(first["padded"])), first
    tmp.cleanup()
    return out


def bench_stage2(args):
    from transformers import CLIPVisionConfig

    from llm2clip.losses.clip import ClipLoss
    from llm2clip.model.clip_model import LLM2CLIPModel
    from llm2clip.vision.towers import VisionTower

    dev, dtype = device_and_dtype(args)
    shape = VIT_SHAPES[args.shape]
    from transformers import CLIPVisionModel

    with torch.device(dev):
        hf = CLIPVisionModel._from_config(CLIPVisionConfig(**shape), attn_implementation="sdpa", dtype=dtype)
    tower = VisionTower("hf_clip", hf, proj=None, image_size=shape["image_size"], mean=(0.5,) * 3, std=(0.5,) * 3,
                        logit_scale_init=None, logit_bias_init=None, hf_class="CLIPVisionModel")
    if args.grad_ckpt:
        tower.enable_grad_checkpointing()
    model = LLM2CLIPModel(tower, llm_dim=args.llm_dim, embed_dim=1280, adapter_blocks=4).to(dev, dtype)
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    B, S = args.batch, shape["image_size"]
    px = torch.randn(B, 3, S, S, device=dev, dtype=dtype)
    emb = torch.randn(B, args.llm_dim, device=dev, dtype=dtype)
    n_tower = sum(p.numel() for p in tower.parameters())
    n_tok = (S // shape["patch_size"]) ** 2 + 1

    def step():
        loss = loss_fn(*model(px, emb))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, args.warmup, args.iters, dev)
    flops = 6 * n_tower * n_tok * B
    return report(args, dev, dtype, f"{args.shape} + adapter(4 blocks, d={args.llm_dim}), batch {B}",
                  f"{B / dt:,.1f} images/s", flops / dt, dt)


def report(args, dev, dtype, what: str, rate: str, flops_per_s: float, dt: float) -> str:
    peak = args.peak_tflops if args.peak_tflops is not None else (989.0 if dev.type == "cuda" else None)
    mem = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda"
           else __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss / 2**20)
    machine = torch.cuda.get_device_name() if dev.type == "cuda" else \
        f"CPU {platform.machine()} x{torch.get_num_threads()} threads"
    mfu = f"{100 * flops_per_s / (peak * 1e12):.1f}%" if peak else "n/a"
    row = (f"| {args.stage} | {machine} | {what}, {str(dtype).replace('torch.', '')} | {rate} | "
           f"{flops_per_s / 1e12:.3f} TFLOP/s | MFU {mfu} | {dt * 1000:.0f} ms/step | peak mem {mem:.2f} GiB | "
           f"`python bench/bench_train_step.py {' '.join(sys.argv[1:])}` |")
    print(row)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["stage1", "stage1-mix", "stage2"])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="stage1: pairs per step (2x texts); stage2: images")
    ap.add_argument("--seq", type=int, default=64, help="stage1 tokens per caption")
    ap.add_argument("--llm-dim", type=int, default=4096, help="stage2: width of the LLM embeddings")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--samples", type=int, default=1000, help="stage1-mix: synthetic image samples")
    ap.add_argument("--hidden", type=int, default=64, help="stage1-mix: model width (the demo's: 64)")
    ap.add_argument("--layers", type=int, default=2, help="stage1-mix: model depth (the demo's: 2)")
    ap.add_argument("--repeats", type=int, default=3, help="stage1-mix: interleaved passes over the batches")
    ap.add_argument("--token-budget", type=int, default=2048, help="stage1-mix: budget of the buckets variant")
    args = ap.parse_args(argv)
    if args.stage == "stage1-mix":
        torch.manual_seed(0)
        return bench_stage1_mix(args)
    shapes = LLM_SHAPES if args.stage == "stage1" else VIT_SHAPES
    if args.shape not in shapes:
        ap.error(f"--shape for {args.stage}: one of {sorted(shapes)}")
    torch.manual_seed(0)
    return bench_stage1(args) if args.stage == "stage1" else bench_stage2(args)


if __name__ == "__main__":
    main()
