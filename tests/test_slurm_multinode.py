"""The launchers across nodes, on a real multi-node Slurm: each node a network namespace with its own
hostname and address (tests/slurm_cluster.py, fixture ``slurm_multinode``: node1..node3 on a private
bridge). Every job takes two nodes, one CPU task per node, so every collective crosses "machines".

- stage 1 over 2 nodes: world size 2, rank 0 on the first node of the allocation and MASTER_ADDR its
  address, rank 1 on the other node; losses equal to a single-machine 2-process torchrun run;
- embed over 2 nodes: sidecars byte-identical to a 1-process embed;
- stage 2 over 2 nodes, preempted with ``scancel --signal=USR1``: requeued, back on *other* nodes
  (the first node is drained meanwhile, so rank 0 and MASTER_ADDR move), resumed, and finished with
  the losses of an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster
from tests.helpers import ROOT, read_metrics, run_cmd, torchrun
from tests.test_slurm_pipeline import job_env as _pipeline_job_env


def REAL_SLURM(test):
    """Markers declared in pyproject.toml: `-m "not slurm"` (or "not slow") deselects these."""
    return pytest.mark.slow(pytest.mark.slurm(test))


ALLOC = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20"]
# Logged by slurm/_common.sh: the batch shell once per run, each task once per run.
BATCH_LINE = re.compile(r"job=(\d+) restart=(\d+) nodes=(\d+) \(([^)]*)\) world_size=(\d+) master=([^:\s]+):(\d+)")
TASK_LINE = re.compile(r"\[llm2clip task\] rank=(\d+) local_rank=(\d+) local_world_size=(\S+) node_rank=(\d+) host=(\S+) "
                       r"master=([^(]+)\(([^)]*)\):(\d+)")


def job_env() -> dict[str, str]:
    # The same environment tests.helpers.run_cmd gives the single-machine reference runs.
    return {**_pipeline_job_env(Path(".")), "DS_ACCELERATOR": "cpu", "LLM2CLIP_HASH_CACHE": "off"}


class Jobs:
    """sbatch with the 2-node allocation, logs under ``tmp/logs``."""

    def __init__(self, cluster, tmp: Path):
        self.cluster, self.tmp = cluster, tmp
        (tmp / "logs").mkdir(exist_ok=True)

    def submit(self, script: str, *args: str) -> int:
        opts = [*ALLOC, f"--output={self.tmp}/logs/%x-%j.out"]
        return self.cluster.sbatch([*opts, str(ROOT / "slurm" / script), *args], env=job_env(), cwd=self.tmp)

    def log(self, job: int) -> str:
        return "\n".join(p.read_text() for p in (self.tmp / "logs").glob(f"*-{job}.out"))

    def finish(self, job: int, timeout: float = 300) -> str:
        state = self.cluster.wait(job, timeout=timeout)
        assert state == "COMPLETED", (job, state, self.cluster.job_info(job), self.log(job)[-6000:])
        return self.log(job)


def runs_of(log: str) -> list[dict]:
    """Per run (restart) of a job: its node list and master from the batch line, its tasks' lines."""
    runs: list[dict] = []
    for line in log.splitlines():
        if m := BATCH_LINE.search(line):
            runs.append({"restart": int(m[2]), "nodes": m[4].split(), "world": int(m[5]), "master": m[6],
                         "port": m[7], "tasks": {}})
        elif (m := TASK_LINE.search(line)) and runs:
            runs[-1]["tasks"][int(m[1])] = {"local": (m[2], m[3]), "node_rank": int(m[4]), "host": m[5],
                                            "master": m[6], "master_ip": m[7], "port": m[8]}
    return runs


def assert_spans_two_nodes(cluster, run: dict) -> None:
    """Rank 0 on the first node of the allocation, rank 1 on the second; every task found
    MASTER_ADDR = first node, resolving to that node's own address."""
    first, second = run["nodes"]
    assert run["world"] == 2 and run["master"] == first, run
    assert sorted(run["tasks"]) == [0, 1], run
    assert run["tasks"][0]["host"] == first and run["tasks"][1]["host"] == second != first, run
    assert [(t["local"], t["node_rank"]) for _, t in sorted(run["tasks"].items())] == [(("0", "1"), 0), (("0", "1"), 1)]
    for t in run["tasks"].values():
        assert (t["master"], t["master_ip"], t["port"]) == (first, cluster.node_addr(first), run["port"]), run


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}


def assert_same_losses(got: dict[int, float], ref: dict[int, float], steps: int) -> None:
    assert sorted(got) == sorted(ref) == list(range(1, steps + 1)), (sorted(got), sorted(ref))
    # Exactly equal: with 2 ranks gloo's all-reduce sums in the same order whether the peer is a
    # local process or another node, and a resume replays nothing (measured: difference 0.0).
    assert got == ref, {s: (got[s], ref[s]) for s in ref}


# ---------------------------------------------------------------------------------------- stage 1
def stage1_args(w, out: Path, steps: int) -> list[str]:
    return [str(ROOT / "configs/tiny/stage1.yaml"),
            "--set", f"run.output_dir={out}", "--set", f"text.model_path={w['llama']}",
            "--set", f"data.sources=[{{path: '{w['data']}/train/shard-*.tar'}}]",
            "--set", f"data.val_path={w['data']}/val/shard-*.tar", "--set", f"train.max_steps={steps}",
            "--set", "train.micro_batch_size=32", "--set", "train.eval_every=-1", "--set", "train.save_every=1000",
            "--set", "run.log_every=1", "--set", "run.progress_bar=false"]


@REAL_SLURM
def test_stage1_two_nodes_equals_one_machine(slurm_multinode, tiny_world, tmp_path):
    steps = 6
    jobs = Jobs(slurm_multinode, tmp_path)
    job = jobs.submit("stage1.sh", *stage1_args(tiny_world, tmp_path / "two_nodes", steps))
    ref = tmp_path / "one_machine"  # meanwhile: the same config, 2 processes under torchrun here
    cfg, *sets = stage1_args(tiny_world, ref, steps)
    torchrun(str(ROOT / "tools/train_stage1.py"), ["--config", cfg, *sets], nproc=2, timeout=300)
    log = jobs.finish(job)
    (run,) = runs_of(log)
    assert_spans_two_nodes(slurm_multinode, run)
    assert "srun exited with code 0" in log
    assert_same_losses(losses(tmp_path / "two_nodes"), losses(ref), steps)


# ---------------------------------------------------------------------------------------- embed
def embed_args(w, out: Path) -> list[str]:
    return ["--set", f"text.model_path={w['llama']}",
            "--set", f"data.shards={w['data']}/train/shard-*.tar::{w['data']}/val/shard-*.tar",
            "--set", f"output.out_dir={out}", "--set", f"output.image_root={w['data']}",
            "--set", "output.dtype=float32", "--set", "run.progress_bar=false"]


@pytest.fixture(scope="module")
def embedded_two_nodes(slurm_multinode, tiny_world, tmp_path_factory):
    """Sidecars written by a 2-node embed job and by one plain process: (two_nodes_dir, one_dir, log)."""
    tmp = tmp_path_factory.mktemp("embed_multinode")
    jobs = Jobs(slurm_multinode, tmp)
    job = jobs.submit("embed.sh", str(ROOT / "configs/tiny/embed.yaml"), *embed_args(tiny_world, tmp / "two"))
    run_cmd([sys.executable, str(ROOT / "tools/embed_captions.py"), "--config", str(ROOT / "configs/tiny/embed.yaml"),
             *embed_args(tiny_world, tmp / "one")], timeout=300)
    return tmp / "two", tmp / "one", jobs.finish(job)


@REAL_SLURM
def test_embed_two_nodes_byte_identical(slurm_multinode, embedded_two_nodes):
    two, one, log = embedded_two_nodes
    (run,) = runs_of(log)
    assert_spans_two_nodes(slurm_multinode, run)
    summary = json.loads((two / "embed_summary.json").read_text())
    assert summary["world_size"] == 2 and not summary["errors"], summary
    assert all(t > 0 for t in summary["encode_seconds_per_rank"]), "both nodes must get work"
    # Sidecars, manifests and indexes are the same, byte for byte; only the run records differ
    # (the config holds the output path, the summary timings and the world size).
    records = ("embed_summary.json", "embed_config.yaml")
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name not in records)
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.name not in records)
    assert sum(p.suffix == ".tar" for p in files) == 5, files
    for rel in files:
        assert (one / rel).read_bytes() == (two / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------- stage 2
def stage2_args(w, emb: Path, out: Path, steps: int) -> list[str]:
    return [str(ROOT / "configs/tiny/stage2.yaml"),
            "--set", f"run.output_dir={out}", "--set", f"vision.path={w['clip']}",
            "--set", f"data.shards={w['data']}/train/shard-*.tar", "--set", f"data.sidecar.out_dir={emb}",
            "--set", f"data.sidecar.image_root={w['data']}", "--set", f"data.val_shards={w['data']}/val/shard-*.tar",
            "--set", "data.num_workers=1", "--set", "train.micro_batch_size=32", "--set", f"train.max_steps={steps}",
            "--set", "train.eval_every=-1", "--set", "train.save_every=1000", "--set", "run.log_every=1",
            "--set", "run.progress_bar=false"]


@REAL_SLURM
def test_stage2_preempted_requeues_onto_other_nodes_and_resumes(slurm_multinode, tiny_world, embedded_two_nodes,
                                                                 tmp_path):
    steps, cluster = 16, slurm_multinode
    emb = embedded_two_nodes[0]
    jobs = Jobs(cluster, tmp_path)
    out = tmp_path / "preempted"
    job = jobs.submit("stage2.sh", *stage2_args(tiny_world, emb, out, steps))
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").is_file() or not any(s >= 3 for s in losses(out)):
        assert time.monotonic() < deadline, f"no progress\n{jobs.log(job)[-6000:]}"
        assert cluster.state(job) in ("PENDING", "CONFIGURING", "RUNNING"), jobs.log(job)[-6000:]
        time.sleep(0.3)
    first_nodes = cluster.run(["squeue", "-h", "-j", str(job), "-o", "%N"]).stdout.strip()
    first = cluster.run(["scontrol", "show", "hostnames", first_nodes]).stdout.split()[0]
    # Drain the job's first node: the requeued job must come back elsewhere, with a new rank 0 and
    # MASTER_ADDR (the running job is not disturbed by a drain).
    cluster.run(["scontrol", "update", f"NodeName={first}", "State=DRAIN", "Reason=l2c-test"])
    try:
        cluster.scancel("--signal=USR1", str(job))
        ref = tmp_path / "uninterrupted"  # meanwhile (the requeue hold): the reference run here
        cfg, *sets = stage2_args(tiny_world, emb, ref, steps)
        torchrun(str(ROOT / "tools/train_stage2.py"), ["--config", cfg, *sets], nproc=2, timeout=300)
        log = jobs.finish(job, timeout=400)
    finally:
        cluster.run(["scontrol", "update", f"NodeName={first}", "State=RESUME"], check=False)
    assert int(cluster.job_info(job)["Restarts"]) >= 1
    runs = runs_of(log)
    assert [r["restart"] for r in runs] == list(range(len(runs))) and len(runs) >= 2, runs
    for r in runs:
        assert_spans_two_nodes(cluster, r)
    assert runs[0]["master"] == first and first not in runs[-1]["nodes"], runs
    assert "resumed from" in log and "exiting 42" in log and ": requeueing job" in log
    assert_same_losses(losses(out), losses(ref), steps)


# ---------------------------------------------------------------------------------------- the harness
def test_no_namespaces_skips_or_fails_in_ci(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "_probe_netns", lambda: "network namespaces not permitted here (test)")
    if slurm_cluster.missing_requirements(1):
        pytest.skip("no single-node Slurm here either: nothing to tell apart")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs network namespaces: network namespaces not permitted"):
        slurm_cluster.require_slurm(2)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="allow network namespaces"):
        slurm_cluster.require_slurm(2)


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"


@REAL_SLURM
def test_cluster_cleans_up_after_a_failure(tmp_path):
    """A failure inside `with LocalSlurm(nodes=2)` still stops every daemon by PID and removes the
    namespaces, the veth pairs and the bridge; so does a start that fails half-way."""
    slurm_cluster.require_slurm(2)
    cluster = slurm_cluster.LocalSlurm(tmp_path / "c", nodes=2)
    with pytest.raises(RuntimeError, match="boom"):
        with cluster:
            pids, net = cluster.pids(), cluster.net
            assert sorted(pids) == ["munged", "slurmctld", "slurmd@node1", "slurmd@node2"]
            assert len(net.leftovers()) == 5  # 2 namespaces, 2 host-side veths, 1 bridge
            raise RuntimeError("boom")
    assert all(_dead(p) for p in pids.values()), pids
    assert net.leftovers() == [] and not (tmp_path / "c" / "cluster.json").exists()

    broken = slurm_cluster.LocalSlurm(tmp_path / "b", nodes=2)
    with pytest.raises(slurm_cluster.SlurmStartError, match="timed out"):
        broken.start(timeout=0)  # fails at the first wait, with the network up and munged started
    assert broken.net is not None and broken.net.leftovers() == []
    assert not broken.pids()
