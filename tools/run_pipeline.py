#!/usr/bin/env python
"""The whole LLM2CLIP pipeline on the embedded default (tiny models + generated data), end to end:

    synthetic data -> tiny models -> stage 1 (CRA before/after) -> embed -> stage 2 -> CLIP baseline -> eval

Each stage runs through the same CLI a user runs (tools/*.py with configs/tiny/*.yaml), as a
subprocess, so what this proves is what users get; its output goes to <out>/logs/<stage>.log and its
progress bar (with ETA) to this terminal. The CLIP baseline is the same tiny CLIP trained with its own
77-token text tower on the same images and short captions, batch, steps and lr schedule as stage 2
(tools/train_clip_baseline.py): the final table compares LLM2CLIP's LLM text side with CLIP's own on
short-caption retrieval, dense-caption retrieval and zero-shot classification, and writes
`<out>/pipeline_summary.json`. TensorBoard logs: `tensorboard --logdir <out>`.

    python tools/run_pipeline.py                    # a few minutes on 2 CPU cores (docs/PERFORMANCE.md)
    python tools/run_pipeline.py --nproc 2          # every training stage under torchrun, 2 ranks
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


_BAR = re.compile(rb"\d+%\|.*\|")  # a tqdm bar segment: "...  40%|####      | 40/100 [00:10<00:15, ...]"


def sh(args: list[str], log: Path, env: dict, done: Path | None = None, skip_done: bool = False) -> None:
    """Run one stage, output to a log; its progress bar is echoed to this terminal on one line. On failure
    show the tail and stop. With --skip-done, a stage whose `done` file exists is not run again."""
    if skip_done and done is not None and done.exists():
        print(f"(skip, done: {done})", flush=True)
        return
    print(f"$ {' '.join(args)}", flush=True)
    t0 = time.time()
    tty = sys.stdout.isatty()
    with open(log, "wb") as f:
        p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pending, last = b"", 0.0
        for chunk in iter(lambda: p.stdout.read1(65536), b""):
            f.write(chunk)
            pending = (pending + chunk)[-4096:]
            bars = [seg for seg in re.split(rb"[\r\n]", pending) if _BAR.search(seg)]
            now = time.time()
            # a live line on a terminal; a line every 30 s in a log (no carriage-return soup)
            if bars and (tty or now - last > 30):
                line = bars[-1].decode("utf-8", "replace").strip()[:150]
                print(f"\r  {line}" if tty else f"  {line}", end="" if tty else "\n", flush=True)
                last = now
        p.wait()
        if tty and last:
            print(flush=True)
    if p.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit(f"stage failed (exit {p.returncode}); last lines of {log}:\n" + "\n".join(tail))
    print(f"  done in {time.time() - t0:.0f}s (log: {log})", flush=True)


def write_short_pairs(karpathy: Path, out: Path) -> Path:
    """1:1 (image, first caption) pairs from the synthetic Karpathy file: short-caption retrieval, the
    side CLIP's 77-token text tower was made for (long.jsonl is the dense-caption side)."""
    d = json.loads(karpathy.read_text())
    lines = [json.dumps({"image": f"{im['filepath']}/{im['filename']}", "caption": im["sentences"][0]["raw"]})
             for im in d["images"]]
    out.write_text("".join(line + "\n" for line in lines))
    return out


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
                    "--set", f"data.val_path={data}/val/shard-*.tar", "--set", f"train.max_steps={args.stage1_steps}"],
          logs / "stage1.log", s1 / "summary.json")

    emb = out / "embed"
    stage(launch + ["tools/embed_captions.py", "--config", "configs/tiny/embed.yaml",
                    "--set", f"text.model_path={s1 / 'export/merged'}",
                    "--set", f"data.shards={data}/train/shard-*.tar::{data}/val/shard-*.tar",
                    "--set", f"output.out_dir={emb}", "--set", f"output.image_root={data}"],
          logs / "embed.log", emb / "val" / "index.json")

    s2 = out / "stage2"
    s2_args = ["--config", "configs/tiny/stage2.yaml", "--set", f"run.output_dir={s2}",
               "--set", f"vision.path={models / 'tiny-clip'}", "--set", f"data.shards={data}/train/shard-*.tar",
               "--set", f"data.sidecar.out_dir={emb}", "--set", f"data.sidecar.image_root={data}",
               "--set", f"data.val_shards={data}/val/shard-*.tar", "--set", f"train.max_steps={args.stage2_steps}"]
    # model.save_initial: the same model before any step, to answer "did stage 2 help?"
    stage(launch + ["tools/train_stage2.py", *s2_args, "--set", "model.save_initial=true"], logs / "stage2.log",
          s2 / "summary.json")

    # The baseline: the same tiny CLIP, trained with its own text tower on the same images (short captions),
    # batch, steps and schedule as stage 2.
    bl = out / "clip_baseline"
    stage(launch + ["tools/train_clip_baseline.py", "--config", "configs/tiny/clip_baseline.yaml",
                    "--set", f"run.output_dir={bl}", "--set", f"model.path={models / 'tiny-clip'}",
                    "--set", f"data.shards={data}/train/shard-*.tar", "--set", f"train.max_steps={args.stage2_steps}"],
          logs / "clip_baseline.log", bl / "summary.json")

    ev = out / "eval"
    retr = data / "eval" / "retrieval"
    short = write_short_pairs(retr / "karpathy.json", retr / "short.jsonl")
    stage(launch + ["tools/eval_zero_shot.py",
                    "--model", f"llm2clip=llm2clip:{s2 / 'export/model'}",
                    "--model", f"clip_baseline=hf_clip:{bl / 'export/model'}",
                    "--model", f"untrained=llm2clip:{s2 / 'export/initial_model'}",
                    "--dataset", f"short=jsonl:{short}",
                    "--dataset", f"long=jsonl:{retr / 'long.jsonl'}",
                    "--dataset", f"colors=imagefolder:{data / 'eval/classification'}",
                    "--output", str(ev / "results.json")], logs / "eval.log")

    s1_sum = json.loads((s1 / "summary.json").read_text())
    s2_sum = json.loads((s2 / "summary.json").read_text())
    results = json.loads((ev / "results.json").read_text())
    summary = {"seconds": round(time.time() - t_start, 1), "stage1": s1_sum, "stage2": s2_sum,
               "eval": results["results"], "out": str(out),
               "where": {"tensorboard": f"tensorboard --logdir {out}", "llm2clip_model": str(s2 / "export/model"),
                         "hf_vision": str(s2 / "export/hf_vision"), "clip_baseline": str(bl / "export/model"),
                         "stage1_encoder": str(s1 / "export/merged"), "eval": str(ev / "results.json"),
                         "logs": str(logs)}}
    (out / "pipeline_summary.json").write_text(json.dumps(summary, indent=1))
    print(final_table(summary, results, args.val))
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
    chance = {"short": 100 / n_val, "long": 100 / n_val}
    n_classes = {name: d.get("classes") for name, d in results.get("datasets", {}).items()}
    rows += ["", "| dataset | metric | " + " | ".join(models) + " | chance |", "|---|---|" + "---:|" * (len(models) + 1)]
    for ds in datasets:
        for metric in ("i2t_R@1", "t2i_R@1", "top1"):
            if not any(metric in res[m].get(ds, {}) for m in models):
                continue
            ch = (100 / n_classes[ds]) if metric == "top1" and n_classes.get(ds) else chance.get(ds)
            vals = " | ".join(f"{res[m].get(ds, {}).get(metric, float('nan')):.1f}" for m in models)
            rows.append(f"| {ds} | {metric} | {vals} | {ch:.1f} |" if ch else f"| {ds} | {metric} | {vals} | |")
    rows.append("\nshort / long: 1:1 image-caption retrieval with the short / the dense caption of each held-out "
                "image; colors: zero-shot classification. llm2clip = stage 2's model; clip_baseline = the same tiny "
                "CLIP trained with its own 77-token text tower on the same images and short captions for as many "
                "steps; untrained = the stage-2 model before any step.")
    rows.append(f"All figures in %. Wall time {summary['seconds']:.0f} s; outputs in {summary['out']}.")
    w = summary.get("where", {})
    if w:
        rows += ["", "| what | where |", "|---|---|",
                 f"| TensorBoard logs (stage1/tb, stage2/tb, clip_baseline/tb) | `{w['tensorboard']}` |",
                 f"| LLM2CLIP model (`llm2clip.load_model`) | {w['llm2clip_model']} |",
                 f"| vision tower for LLaVA-style models (HF CLIPVisionModelWithProjection) | {w['hf_vision']} |",
                 f"| stage-1 text encoder | {w['stage1_encoder']} |",
                 f"| trained CLIP baseline (HF CLIPModel) | {w['clip_baseline']} |",
                 f"| eval results / stage logs | {w['eval']} / {w['logs']} |"]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
