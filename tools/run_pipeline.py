#!/usr/bin/env python
"""The whole LLM2CLIP pipeline on the embedded default (tiny models + generated data), end to end:

    synthetic data -> tiny models -> stage 1 (CRA before/after) -> embed -> stage 2 -> zero-shot eval

Each stage runs through the same CLI a user runs (tools/*.py with configs/tiny/*.yaml), as a
subprocess, so what this proves is what users get. Prints one final table and writes
`<out>/pipeline_summary.json`. TensorBoard logs: `tensorboard --logdir <out>`.

    python tools/run_pipeline.py                    # ~4 min on 2 CPU cores
    python tools/run_pipeline.py --nproc 2          # every training stage under torchrun, 2 ranks
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sh(args: list[str], log: Path, env: dict, done: Path | None = None, skip_done: bool = False) -> None:
    """Run one stage, output to a log; on failure show the tail and stop. With --skip-done, a stage whose
    `done` file exists is not run again."""
    if skip_done and done is not None and done.exists():
        print(f"(skip, done: {done})", flush=True)
        return
    print(f"$ {' '.join(args)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise SystemExit(f"stage failed (exit {p.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s (log: {log})", flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny", help="everything goes here (default: runs/tiny, the path "
                                                       "configs/tiny/*.yaml use)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per training stage (torchrun when > 1)")
    ap.add_argument("--train", type=int, default=2000, help="synthetic training images")
    ap.add_argument("--val", type=int, default=500, help="synthetic held-out images")
    ap.add_argument("--stage1-steps", type=int, default=80)
    ap.add_argument("--stage2-steps", type=int, default=300)
    ap.add_argument("--skip-done", action="store_true", help="reuse stages that already finished in --out")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.nproc > 1 else "2")}

    def stage(cmd: list[str], log: Path, done: Path | None = None) -> None:
        sh(cmd, log, env, done, args.skip_done)

    py = [sys.executable]
    launch = py + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
                   if args.nproc > 1 else [])
    data, models = out / "data", out / "models"
    t_start = time.time()

    stage(py + ["tools/make_synthetic_data.py", "--out", str(data), "--train", str(args.train), "--val",
                str(args.val), "--shard-size", str(max(1, args.train // 4)), "--cls-attr", "color"], logs / "data.log",
          data / "eval" / "classification" / "classnames.txt")
    stage(py + ["tools/make_tiny_models.py", "--tokenizer", str(data / "tokenizer"), "--out", str(models),
                "--families", "llama,clip"], logs / "models.log", models / "tiny-clip" / "model.safetensors")

    s1 = out / "stage1"
    stage(launch + ["tools/train_stage1.py", "--config", "configs/tiny/stage1.yaml",
                    "--set", f"run.output_dir={s1}", "--set", f"text.model_path={models / 'tiny-llama'}",
                    "--set", f"data.sources=[{{path: '{data}/train/shard-*.tar'}}]",
                    "--set", f"data.val_path={data}/val/shard-*.tar", "--set", f"train.max_steps={args.stage1_steps}",
                    "--set", "run.progress_bar=false"], logs / "stage1.log", s1 / "summary.json")

    emb = out / "embed"
    stage(launch + ["tools/embed_captions.py", "--config", "configs/tiny/embed.yaml",
                    "--set", f"text.model_path={s1 / 'export/merged'}",
                    "--set", f"data.shards={data}/train/shard-*.tar::{data}/val/shard-*.tar",
                    "--set", f"output.out_dir={emb}", "--set", f"output.image_root={data}",
                    "--set", "run.progress_bar=false"], logs / "embed.log", emb / "val" / "index.json")

    s2 = out / "stage2"
    s2_args = ["--config", "configs/tiny/stage2.yaml", "--set", f"run.output_dir={s2}",
               "--set", f"vision.path={models / 'tiny-clip'}", "--set", f"data.shards={data}/train/shard-*.tar",
               "--set", f"data.sidecar.out_dir={emb}", "--set", f"data.sidecar.image_root={data}",
               "--set", f"data.val_shards={data}/val/shard-*.tar", "--set", f"train.max_steps={args.stage2_steps}",
               "--set", "run.progress_bar=false"]
    # model.save_initial: the same model before any step, to answer "did stage 2 help?"
    stage(launch + ["tools/train_stage2.py", *s2_args, "--set", "model.save_initial=true"], logs / "stage2.log",
          s2 / "summary.json")

    ev = out / "eval"
    stage(launch + ["tools/eval_zero_shot.py",
                    "--model", f"llm2clip=llm2clip:{s2 / 'export/model'}",
                    "--model", f"untrained=llm2clip:{s2 / 'export/initial_model'}",
                    "--model", f"clip_baseline=hf_clip:{models / 'tiny-clip'}",
                    "--dataset", f"retrieval=karpathy:{data / 'eval/retrieval/karpathy.json'}",
                    "--dataset", f"long=jsonl:{data / 'eval/retrieval/long.jsonl'}",
                    "--dataset", f"colors=imagefolder:{data / 'eval/classification'}",
                    "--output", str(ev / "results.json")], logs / "eval.log")

    s1_sum = json.loads((s1 / "summary.json").read_text())
    s2_sum = json.loads((s2 / "summary.json").read_text())
    results = json.loads((ev / "results.json").read_text())
    summary = {"seconds": round(time.time() - t_start, 1), "stage1": s1_sum, "stage2": s2_sum,
               "eval": results["results"], "out": str(out)}
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=1))
    print(final_table(summary, results, args.val))
    print(f"\nTensorBoard: tensorboard --logdir {out}    (stage1/tb, stage2/tb)")
    return summary


def final_table(summary: dict, results: dict, n_val: int) -> str:
    s1 = summary["stage1"]
    rows = ["", "## LLM2CLIP on the embedded default (tiny models, synthetic data)", "",
            "| measure | value |", "|---|---|",
            f"| CRA before stage 1 (held-out {n_val} pairs, chance {100 / (2 * n_val - 1):.2f}) "
            f"| {s1['eval_start']['eval/cra']:.1f} |",
            f"| CRA after stage 1 | {s1['eval_end']['eval/cra']:.1f} |"]
    res = results["results"]  # model -> dataset -> metric
    models = list(res)
    datasets = list(dict.fromkeys(d for m in res.values() for d in m))
    chance = {"retrieval": 100 / n_val, "long": 100 / n_val}
    n_classes = {name: d.get("classes") for name, d in results.get("datasets", {}).items()}
    rows += ["", "| dataset | metric | " + " | ".join(models) + " | chance |", "|---|---|" + "---:|" * (len(models) + 1)]
    for ds in datasets:
        for metric in ("i2t_R@1", "t2i_R@1", "top1"):
            if not any(metric in res[m].get(ds, {}) for m in models):
                continue
            ch = (100 / n_classes[ds]) if metric == "top1" and n_classes.get(ds) else chance.get(ds)
            vals = " | ".join(f"{res[m].get(ds, {}).get(metric, float('nan')):.1f}" for m in models)
            rows.append(f"| {ds} | {metric} | {vals} | {ch:.1f} |" if ch else f"| {ds} | {metric} | {vals} | |")
    rows.append(f"\nAll figures in %. Wall time {summary['seconds']:.0f} s; outputs in {summary['out']}.")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
