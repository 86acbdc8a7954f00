#!/usr/bin/env python
"""Stage-1 step time, train.strategy=zero3 vs replicated, same data and model, side by side (CPU, 2 procs).

    python bench/bench_strategy.py --steps 12

Builds the tiny synthetic world (tiny Llama, captions), runs tools/train_stage1.py under torchrun once
per strategy (fp32, no eval, no checkpoints) and reports the median tokens/s of the logged steps after
the first two (warm-up) and the ratio.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=32)
    a = ap.parse_args()
    from llm2clip.data.synthetic import generate
    from llm2clip.testing.tiny_models import make_tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="bench_strategy_"))
    generate(tmp / "data", n_train=800, n_val=50, seed=0, image_size=32, shard_size=200, cls_per_class=10)
    models = make_tiny_models(tmp / "data" / "tokenizer", tmp / "models")
    res = {}
    for strategy in ("zero3", "replicated"):
        out = tmp / strategy
        args = ["--set", f"run.output_dir={out}", "--set", f"text.model_path={models['llama']}",
                "--set", f"data.sources=[{{path: '{tmp}/data/train/shard-*.tar'}}]", "--set", "data.val_path=",
                "--set", "text.max_length=64", "--set", "text.attn_implementation=sdpa",
                "--set", "train.deepspeed_config=ds_configs/zero3_bf16.json", "--set", "train.precision=fp32",
                "--set", f"train.micro_batch_size={a.micro_batch}", "--set", f"train.max_steps={a.steps}",
                "--set", "train.eval_every=0", "--set", "train.save_every=0", "--set", "run.log_every=1",
                "--set", "run.progress_bar=false", "--set", "run.tensorboard=false",
                "--set", f"train.strategy={strategy}"]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            f"--nproc_per_node={a.nproc}", str(ROOT / "tools/train_stage1.py"), *args],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        tps = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][2:]
        res[strategy] = statistics.median(tps)
    print(f"stage-1 step, tiny Llama, {a.nproc} procs x micro-batch {a.micro_batch}, fp32 CPU, median of "
          f"steps 3..{a.steps}")
    for k, v in res.items():
        print(f"  {k:<11} {v:10.0f} tokens/s")
    print(f"  replicated / zero3 throughput: {res['replicated'] / res['zero3']:.2f}x")


if __name__ == "__main__":
    main()
