"""The real launchers on a real (local, single-node) Slurm, running the real trainers on the tiny config:

sbatch stage1 -> sbatch embed (afterok) -> sbatch stage2 (afterok) -> python tools/eval_zero_shot.py,
and preemption: `scancel --signal=USR1` on a running stage-2 job makes it checkpoint, requeue itself,
resume and finish with exactly the losses of the uninterrupted job.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, read_metrics, run_cmd

ALLOC = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def job_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "LLM2CLIP_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")}
    env.update({"PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT), "LLM2CLIP_ROOT": str(ROOT)})
    return env


def stage2_overrides(w, emb, out, steps):
    return ["--set", f"run.output_dir={out}", "--set", f"vision.path={w['clip']}",
            "--set", f"data.shards={w['data']}/train/shard-*.tar", "--set", f"data.sidecar.out_dir={emb}",
            "--set", f"data.sidecar.image_root={w['data']}", "--set", f"data.val_shards={w['data']}/val/shard-*.tar",
            "--set", "train.micro_batch_size=32", "--set", f"train.max_steps={steps}", "--set", "train.eval_every=0",
            "--set", "train.save_every=1000", "--set", "run.log_every=1", "--set", "run.progress_bar=false"]


def test_sbatch_pipeline_and_preemption(slurm, tiny_world, tmp_path):
    w, env = tiny_world, job_env(tmp_path)
    (tmp_path / "logs").mkdir()
    s1, emb, s2, s2p = tmp_path / "stage1", tmp_path / "embed", tmp_path / "stage2", tmp_path / "stage2_preempted"

    def sbatch(script, *args, dep=None):
        opts = ALLOC + [f"--output={tmp_path}/logs/%x-%j.out"] + ([f"--dependency=afterok:{dep}"] if dep else [])
        return slurm.sbatch([*opts, str(ROOT / "slurm" / script), *args], env=env, cwd=tmp_path)

    j1 = sbatch("stage1.sh", str(ROOT / "configs/tiny/stage1.yaml"),
                "--set", f"run.output_dir={s1}", "--set", f"text.model_path={w['llama']}",
                "--set", f"data.sources=[{{path: '{w['data']}/train/shard-*.tar'}}]",
                "--set", f"data.val_path={w['data']}/val/shard-*.tar", "--set", "train.max_steps=20",
                "--set", "train.micro_batch_size=32", "--set", "run.progress_bar=false")
    j2 = sbatch("embed.sh", str(ROOT / "configs/tiny/embed.yaml"),
                "--set", f"text.model_path={s1}/export/merged",
                "--set", f"data.shards={w['data']}/train/shard-*.tar::{w['data']}/val/shard-*.tar",
                "--set", f"output.out_dir={emb}", "--set", f"output.image_root={w['data']}",
                "--set", "run.progress_bar=false", dep=j1)
    j3 = sbatch("stage2.sh", str(ROOT / "configs/tiny/stage2.yaml"), *stage2_overrides(w, emb, s2, 30), dep=j2)
    assert slurm.state(j3) == "PENDING"  # waits on its dependency
    for j in (j1, j2, j3):
        state = slurm.wait(j, timeout=600)
        assert state == "COMPLETED", (j, state, _logs(tmp_path))
    s1_sum = json.loads((s1 / "summary.json").read_text())
    assert s1_sum["eval_end"]["eval/cra"] > s1_sum["eval_start"]["eval/cra"] + 10
    assert json.loads((emb / "train/index.json").read_text())["shards"] == 4
    assert (s2 / "export/model/model.safetensors").is_file()

    # evaluation on the outputs of the Slurm jobs
    res = tmp_path / "eval/results.json"
    run_cmd([sys.executable, str(ROOT / "tools/eval_zero_shot.py"),
             "--model", f"ours=llm2clip:{s2}/export/model", "--model", f"baseline=hf_clip:{w['clip']}",
             "--dataset", f"retrieval=karpathy:{w['data']}/eval/retrieval/karpathy.json",
             "--dataset", f"shapes=imagefolder:{w['data']}/eval/classification",
             "--output", str(res)], timeout=300)
    out = json.loads(res.read_text())
    assert res.with_suffix(".md").is_file()
    assert out["results"]["ours"]["retrieval"]["i2t_R@1"] >= 0 and "top1" in out["results"]["baseline"]["shapes"]

    # preemption: the same stage-2 job, signalled mid-run
    j4 = sbatch("stage2.sh", str(ROOT / "configs/tiny/stage2.yaml"), *stage2_overrides(w, emb, s2p, 30))
    deadline = time.time() + 300
    while time.time() < deadline:
        rows = read_metrics(s2p) if (s2p / "metrics.jsonl").is_file() else []
        if any(r.get("step", 0) >= 5 for r in rows):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"stage-2 job made no progress\n{_logs(tmp_path)}")
    slurm.scancel("--signal=USR1", str(j4))
    state = slurm.wait(j4, timeout=600)
    assert state == "COMPLETED", (state, _logs(tmp_path))
    assert int(slurm.job_info(j4).get("Restarts", "0")) >= 1, slurm.job_info(j4)
    ref = {r["step"]: r for r in read_metrics(s2) if "train/loss" in r}
    got = {r["step"]: r for r in read_metrics(s2p) if "train/loss" in r}
    assert sorted(got) == list(range(1, 31))
    for s in range(1, 31):
        assert abs(ref[s]["train/loss"] - got[s]["train/loss"]) < 1e-5, (s, ref[s], got[s])
    log = next((tmp_path / "logs").glob(f"*-{j4}.out")).read_text()
    assert "resumed from" in log and "exiting 42" in log


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").glob("*.out")))
