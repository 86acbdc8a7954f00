#!/usr/bin/env python
"""Training-step throughput, MFU and peak memory for real model shapes (random weights, no download).

    python bench/bench_train_step.py stage1 --shape llama3-8b --batch 64 --seq 128        # on a GPU
    python bench/bench_train_step.py stage1 --shape tiny --batch 32 --seq 64               # anywhere
    python bench/bench_train_step.py stage2 --shape vit-l14-336 --batch 256                # on a GPU

stage1: bidirectional LLM + LoRA (r16, all linear layers), mean pooling, InfoNCE over the batch.
  FLOPs/token = 4 N (forward 2N + activation gradients 2N; the frozen base has no weight gradients;
  recompute not counted), N = non-embedding parameters.
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
    ap.add_argument("stage", choices=["stage1", "stage2"])
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=8, help="stage1: pairs per step (2x texts); stage2: images")
    ap.add_argument("--seq", type=int, default=64, help="stage1 tokens per caption")
    ap.add_argument("--llm-dim", type=int, default=4096, help="stage2: width of the LLM embeddings")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None)
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args(argv)
    shapes = LLM_SHAPES if args.stage == "stage1" else VIT_SHAPES
    if args.shape not in shapes:
        ap.error(f"--shape for {args.stage}: one of {sorted(shapes)}")
    torch.manual_seed(0)
    return bench_stage1(args) if args.stage == "stage1" else bench_stage2(args)


if __name__ == "__main__":
    main()
