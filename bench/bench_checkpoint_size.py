#!/usr/bin/env python
"""Checkpoint bytes with and without the frozen base (lean checkpoints, issue 11), side by side.

Builds a Llama-shaped encoder with random weights (nothing downloaded) + LoRA (the stage-1 defaults:
r16 on all 7 projections), one DeepSpeed engine per ZeRO stage (1 process, fp32, CPU), takes one step,
then writes `engine.save_checkpoint` twice: as before (`exclude_frozen_parameters=False`, the base
re-saved) and as `Trainer._save` does now (`exclude_frozen_parameters=True`). Bytes on disk for `--layers`
layer counts are extrapolated linearly to `--target-layers` (the per-layer cost is the difference).

    python bench/bench_checkpoint_size.py                                 # Llama-3.2-1B shape, 1 and 2 of 16 layers
    python bench/bench_checkpoint_size.py --hidden 128 --ffn 256 --heads 4 --kv-heads 2 --vocab 1000  # quick
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", "29641")
for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
    os.environ.setdefault(k, v)

import torch  # noqa: E402


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def measure(a, layers: int, stage: int) -> dict:
    import deepspeed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, LlamaConfig

    from llm2clip.schema import LoraConfig as LoraCfg

    lora = LoraCfg()  # the stage-1 defaults (r16, alpha 32, all projections)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.ffn, num_hidden_layers=layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
          "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9,
          "zero_optimization": {"stage": stage}}
    torch.manual_seed(0)
    model = get_peft_model(AutoModel.from_config(cfg), LoraConfig(r=lora.r, lora_alpha=lora.alpha,
                                                                  target_modules=lora.target_modules))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    eng.backward(eng(input_ids=torch.randint(0, a.vocab, (1, 8))).last_hidden_state.float().pow(2).mean())
    eng.step()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for lean in (False, True):
            p = Path(d) / f"lean{int(lean)}"
            eng.save_checkpoint(str(p), tag="ds", exclude_frozen_parameters=lean)
            out["lean" if lean else "full"] = dir_bytes(p)
    del eng, model, opt
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--layers", type=int, nargs=2, default=[1, 2])
    ap.add_argument("--target-layers", type=int, default=16)
    ap.add_argument("--stages", type=int, nargs="+", default=[3, 2])
    a = ap.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rows = []
    for stage in a.stages:
        lo, hi = (measure(a, n, stage) for n in a.layers)
        est = {k: lo[k] + (hi[k] - lo[k]) * (a.target_layers - a.layers[0]) // (a.layers[1] - a.layers[0])
               for k in lo}
        rows.append({"zero_stage": stage, "measured": {a.layers[0]: lo, a.layers[1]: hi},
                     f"at_{a.target_layers}_layers": est, "ratio": round(est["full"] / est["lean"], 1)})
    print(json.dumps(rows))
    print(f"\n| ZeRO stage | before (base re-saved) | after (lean) | ratio |  ({a.target_layers} layers, extrapolated)")
    print("|---|---:|---:|---:|")
    for r in rows:
        e = r[f"at_{a.target_layers}_layers"]
        print(f"| {r['zero_stage']} | {e['full']:,} B | {e['lean']:,} B | {r['ratio']}x |")


if __name__ == "__main__":
    main()
