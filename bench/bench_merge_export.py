#!/usr/bin/env python
"""Peak host memory of the stage-1 merged export: streamed merge (llm2clip/lora_merge.py) beside the
previous way (base loaded in fp32 + peft merge_and_unload + save_pretrained), same base and adapter.

    python bench/bench_merge_export.py --layers 2      # Llama-3.2-1B shape (bf16), 2 of its 16 layers

Each way runs in its own subprocess; after the imports its peak RSS is reset (Linux: "5" written to
/proc/self/clear_refs), and the figure is the peak RSS (VmHWM) during the export minus the RSS before it
(file-backed pages of memory-mapped safetensors count, as they do for the machine).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

L1B = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
           vocab_size=128256, tie_word_embeddings=False)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(way: str, base: str, adapter: str, out: str) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from peft import PeftModel  # noqa: F401

    from llm2clip.lora_merge import write_merged

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_mib("VmRSS")
    t0 = time.perf_counter()
    if way == "streamed":
        write_merged(base, [adapter], out, {"is_causal": False}, max_shard_bytes=512 * 1024 ** 2)
    else:
        import torch
        from transformers import AutoModel

        m = AutoModel.from_pretrained(base, dtype=torch.float32)
        PeftModel.from_pretrained(m, adapter).merge_and_unload().save_pretrained(out)
    print(json.dumps({"way": way, "peak_mib": _status_mib("VmHWM") - before, "s": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--child", nargs=4)
    a = ap.parse_args()
    if a.child:
        return child(*a.child)
    import torch
    import transformers as tf
    from peft import LoraConfig, get_peft_model

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    cfg = tf.LlamaConfig(num_hidden_layers=a.layers, **L1B)
    with torch.device("cpu"):
        m = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    m.save_pretrained(str(tmp / "base"))
    base_bytes = sum(p.numel() * p.element_size() for p in m.model.parameters())
    del m
    pm = get_peft_model(tf.AutoModel.from_pretrained(str(tmp / "base"), dtype=torch.bfloat16),
                        LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                        "gate_proj", "up_proj", "down_proj"]))
    pm.save_pretrained(str(tmp / "adapter"))
    del pm
    rows = []
    for way in ("fp32+peft", "streamed"):
        p = subprocess.run([sys.executable, __file__, "--child", way, str(tmp / "base"), str(tmp / "adapter"),
                            str(tmp / way)], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"Llama-3.2-1B shape, {a.layers} layers, bf16 base {base_bytes / 2**20:.0f} MiB (backbone), LoRA r16")
    for r in rows:
        print(f"  {r['way']:<10} peak host memory {r['peak_mib']:8.0f} MiB   {r['s']:6.1f} s")
    print(f"  ratio fp32+peft / streamed: {rows[0]['peak_mib'] / max(rows[1]['peak_mib'], 1):.1f}x")
    import shutil

    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
