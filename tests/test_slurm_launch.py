"""The Slurm launchers (slurm/*.sh): dry runs, then real jobs on a local single-node Slurm.

The real-Slurm tests run tests/fixtures/fake_trainer.py (gloo, one all_reduce per step) through
slurm/stage1.sh via LLM2CLIP_ENTRY, so they test the launcher, not the trainers. They need root
and slurm-wlm; without them they are skipped (failed when CI=true), see tests/slurm_cluster.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import slurm_cluster  # the `slurm` fixture comes in via tests/conftest.py

LocalSlurm = slurm_cluster.LocalSlurm

REPO = Path(__file__).resolve().parent.parent
STAGE1 = REPO / "slurm" / "stage1.sh"
FAKE_ENTRY = "tests/fixtures/fake_trainer.py"
sys.path.insert(0, str(REPO / "tests" / "fixtures"))
from fake_trainer import expected_result  # noqa: E402

# What a 2-CPU test node can host: one node, two tasks, one CPU each, no GPUs.
SMALL_ALLOC = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without Slurm/torchrun variables (the tests may themselves run inside a job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "LLM2CLIP_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE",
                         "OMP_NUM_THREADS", "PYTHON", "TORCHRUN")}
    env.update(extra)
    return env


def hostname_resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def run_script(script: Path, args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=60)


# ---------------------------------------------------------------------------- dry runs (no Slurm)
TASK_LINE = re.compile(
    r"^task node=(\S+) RANK=(\d+) LOCAL_RANK=(\d+) WORLD_SIZE=(\d+) NODE_RANK=(\d+) "
    r"MASTER_ADDR=(\S+) MASTER_PORT=(\d+) OMP_NUM_THREADS=(\d+): (.*)$", re.M)


@pytest.fixture
def fake_two_node_allocation(tmp_path):
    """Environment of a batch script in a 2-node x 8-task job; `scontrol` is a stub on PATH."""
    stub = tmp_path / "bin"
    stub.mkdir()
    scontrol = stub / "scontrol"
    scontrol.write_text(
        '#!/bin/bash\n'
        '[[ $1 == show && $2 == hostnames && $3 == "node[01-02]" ]] && { echo node01; echo node02; exit 0; }\n'
        'echo "stub scontrol: unexpected $*" >&2; exit 1\n')
    scontrol.chmod(0o755)
    return clean_env(
        PATH=f"{stub}:{os.environ['PATH']}", SLURM_JOB_ID="777001", SLURM_JOB_NODELIST="node[01-02]",
        SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8",
        SLURM_CPUS_PER_TASK="12", SLURM_SUBMIT_DIR=str(tmp_path), NCCL_SOCKET_IFNAME="ib0",
    )


def test_dry_run_two_nodes_eight_tasks(fake_two_node_allocation, tmp_path):
    proc = run_script(STAGE1, ["--dry-run", "configs/s1.yaml", "--set", "optim.lr=1e-4", "--set", "note=a b"],
                      fake_two_node_allocation, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    tasks = TASK_LINE.findall(out)
    assert len(tasks) == 16, out
    ports = set()
    for i, (node, rank, local, world, node_rank, addr, port, omp, cmd) in enumerate(tasks):
        assert int(rank) == i
        assert node == ("node01" if i < 8 else "node02")
        assert (int(local), int(node_rank), int(world)) == (i % 8, i // 8, 16)
        assert addr == "node01"
        assert omp == "12"
        ports.add(port)
        assert cmd == f"python {REPO}/tools/train_stage1.py --config configs/s1.yaml --set optim.lr=1e-4 --set note=a\\ b"
    assert ports == {str(20000 + 777001 % 10000)}
    srun = next(line for line in out.splitlines() if line.startswith("srun: "))
    assert "--cpus-per-task=12" in srun and "RANK=$SLURM_PROCID" in srun.replace("\\", "")
    assert "NCCL_SOCKET_IFNAME=ib0" in out  # user NCCL settings pass through untouched


def test_dry_run_env_overrides(fake_two_node_allocation, tmp_path):
    env = dict(fake_two_node_allocation, LLM2CLIP_DRY_RUN="1", MASTER_PORT="29555", PYTHON="/opt/py/bin/python3 -X dev",
               LLM2CLIP_ENTRY=FAKE_ENTRY, OMP_NUM_THREADS="3", LLM2CLIP_SRUN_ARGS="--cpu-bind=cores --label")
    proc = run_script(REPO / "slurm" / "stage2.sh", ["cfg.yaml"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    tasks = TASK_LINE.findall(proc.stdout)
    assert len(tasks) == 16
    assert {t[6] for t in tasks} == {"29555"} and {t[7] for t in tasks} == {"3"}
    assert tasks[0][8] == f"/opt/py/bin/python3 -X dev {REPO}/{FAKE_ENTRY} --config cfg.yaml"
    assert "--cpu-bind=cores --label bash -c" in proc.stdout


def test_dry_run_outside_slurm_uses_torchrun(tmp_path):
    env = clean_env(NPROC_PER_NODE="4")
    proc = run_script(STAGE1, ["--dry-run", "cfg.yaml", "--set", "x=1"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (f"command: python -m torch.distributed.run --standalone --nproc_per_node=4 "
            f"{REPO}/tools/train_stage1.py --config cfg.yaml --set x=1") in proc.stdout
    # Without NPROC_PER_NODE: one process per GPU that nvidia-smi lists.
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "nvidia-smi").write_text("#!/bin/sh\nfor i in 0 1 2 3 4 5 6 7; do echo \"GPU $i: NVIDIA H100 (UUID: x)\"; done\n")
    (stub / "nvidia-smi").chmod(0o755)
    env = clean_env(PATH=f"{stub}:{os.environ['PATH']}", LLM2CLIP_DRY_RUN="1")
    proc = run_script(REPO / "slurm" / "embed.sh", ["cfg.yaml"], env, tmp_path)
    assert "--standalone --nproc_per_node=8 " in proc.stdout, proc.stdout + proc.stderr
    # eval passes everything through verbatim (no --config).
    proc = run_script(REPO / "slurm" / "eval.sh", ["--dry-run", "--ckpt", "c.pt"], clean_env(NPROC_PER_NODE="1"), tmp_path)
    assert proc.stdout.splitlines()[1].endswith(f"{REPO}/tools/eval_zero_shot.py --ckpt c.pt"), proc.stdout
    # Inside a job step (srun --pty bash) auto picks torchrun too: no nested srun.
    proc = run_script(STAGE1, ["--dry-run", "cfg.yaml"], clean_env(SLURM_JOB_ID="5", SLURM_STEP_ID="0",
                                                                 NPROC_PER_NODE="2"), tmp_path)
    assert "launcher=torchrun" in proc.stdout


def test_usage_errors(tmp_path):
    proc = run_script(STAGE1, [], clean_env(), tmp_path)
    assert proc.returncode == 2 and "missing CONFIG" in proc.stderr
    proc = run_script(STAGE1, ["no-such.yaml"], clean_env(), tmp_path)
    assert proc.returncode == 2 and "config file not found: no-such.yaml" in proc.stderr
    proc = run_script(STAGE1, ["--dry-run", "c.yaml"], clean_env(LLM2CLIP_LAUNCHER="srun"), tmp_path)
    assert proc.returncode == 2 and "needs a Slurm allocation" in proc.stderr


def test_missing_slurm_skips_or_fails_in_ci(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "_which", lambda name: None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install slurm-wlm"):
        slurm_cluster.require_slurm()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install slurm-wlm"):
        slurm_cluster.require_slurm()


# ---------------------------------------------------------------------------- real Slurm
def REAL_SLURM(test):
    """Markers declared in pyproject.toml: `-m "not slurm"` (or "not slow") deselects these."""
    return pytest.mark.slow(pytest.mark.slurm(test))


class Job:
    """One fake-trainer run of slurm/stage1.sh on the local cluster."""

    def __init__(self, cluster: LocalSlurm, workdir: Path, name: str, steps: int, step_sleep: float = 0.02,
                 sbatch_args: list[str] = (), extra_sets: list[str] = ()):
        self.cluster = cluster
        self.out = workdir / name
        self.out.mkdir(parents=True)
        cfg = workdir / f"{name}.yaml"
        cfg.write_text(f"out_dir: {self.out}\nsteps: 1000\n")
        (workdir / "logs").mkdir(exist_ok=True)
        sets = [f"steps={steps}", f"step_sleep={step_sleep}", *extra_sets]
        args = [*SMALL_ALLOC, *sbatch_args, str(STAGE1), cfg.name]
        for s in sets:
            args += ["--set", s]
        # Submitted from a directory outside the repo: the script finds the repo through the job
        # record (sbatch runs a spool copy), the relative entry through the repo root.
        env = {"LLM2CLIP_ENTRY": FAKE_ENTRY, "PYTHON": sys.executable}
        if not hostname_resolves(cluster.hostname):  # e.g. a CI container without /etc/hosts entry
            env.update(LLM2CLIP_MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")
        self.id = cluster.sbatch(args, env=env, cwd=workdir)
        self.log = workdir / "logs" / f"llm2clip-stage1-{self.id}.out"

    def wait(self, timeout: float = 120) -> str:
        return self.cluster.wait(self.id, timeout)

    def info(self) -> dict[str, str]:
        return self.cluster.job_info(self.id)

    def json(self, name: str) -> dict:
        return json.loads((self.out / name).read_text())

    def progress(self) -> dict:
        try:
            return self.json("progress.json")
        except (OSError, ValueError):
            return {"step": 0, "restart": -1}

    def wait_progress(self, restart: int, min_step: int, timeout: float = 90) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.progress()
            if p["restart"] == restart and p["step"] >= min_step:
                return p
            if self.cluster.state(self.id) not in ("PENDING", "RUNNING", "CONFIGURING", "REQUEUED", "COMPLETING"):
                break
            time.sleep(0.1)
        raise AssertionError(f"job {self.id} never reached step {min_step} of run {restart}: {self.progress()}, "
                             f"{self.info()}\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else f"<no log {self.log}>"


@REAL_SLURM
def test_sbatch_two_tasks_rendezvous(slurm, tmp_path):
    job = Job(slurm, tmp_path, "run", steps=12)
    assert job.wait() == "COMPLETED", job.log_text()
    assert job.info()["ExitCode"] == "0:0"
    starts = [job.json(f"start-0-{r}.json") for r in (0, 1)]
    for r, s in enumerate(starts):
        assert (s["slurm_procid"], s["env_rank"], s["slurm_localid"]) == (str(r), str(r), str(r))
        assert (s["world"], s["slurm_ntasks"], s["slurm_job_id"]) == (2, "2", str(job.id))
        assert s["master_port"] == str(20000 + job.id % 10000)
        if hostname_resolves(slurm.hostname):
            assert s["master_addr"] == slurm.hostname  # first (only) host of the allocation
        assert s["omp_num_threads"] == "1"
        assert s["argv"][:2] == ["--config", "run.yaml"]
    # The all_reduce sums over both ranks: only a rendezvous of both gives this value.
    assert job.json("result.json")["acc"] == expected_result(12, 2)
    log = job.log_text()
    assert "srun exited with code 0" in log and "finished 12 steps" in log


@REAL_SLURM
def test_dependency_afterok(slurm, tmp_path):
    first = Job(slurm, tmp_path, "first", steps=3, sbatch_args=["--ntasks-per-node=1"])
    second = Job(slurm, tmp_path, "second", steps=3, sbatch_args=["--ntasks-per-node=1",
                                                                  f"--dependency=afterok:{first.id}"])
    assert first.wait() == "COMPLETED", first.log_text()
    assert second.wait() == "COMPLETED", second.log_text()
    assert second.json("result.json")["acc"] == expected_result(3, 1)
    # The second job started only after the first one had written its result.
    assert (second.out / "start-0-0.json").stat().st_mtime >= (first.out / "result.json").stat().st_mtime


@REAL_SLURM
def test_preemption_requeues_and_resumes(slurm, tmp_path):
    """USR1 twice: the documented `scancel --signal=USR1 JOB` (straight to the tasks), then
    `scancel --batch --signal=USR1 JOB` (to the batch shell, which forwards through srun)."""
    steps = 100
    job = Job(slurm, tmp_path, "preempt", steps=steps, step_sleep=0.1)
    job.wait_progress(restart=0, min_step=3)
    slurm.scancel("--signal=USR1", str(job.id))
    p1 = job.wait_progress(restart=1, min_step=1)
    assert p1["step"] < steps
    job.wait_progress(restart=1, min_step=job.json("start-1-0.json")["resumed_from_step"] + 3)
    slurm.scancel("--batch", "--signal=USR1", str(job.id))
    assert job.wait(timeout=150) == "COMPLETED", job.log_text()

    info = job.info()
    assert info["Restarts"] == "2" and info["ExitCode"] == "0:0", info
    resumed = [job.json(f"start-{k}-0.json")["resumed_from_step"] for k in (0, 1, 2)]
    assert resumed[0] == 0 < resumed[1] < resumed[2] < steps, resumed
    for k in (1, 2):  # both ranks of each run resumed from the same checkpoint
        assert job.json(f"start-{k}-1.json")["resumed_from_step"] == resumed[k]
    # Same result as an uninterrupted run: no step lost or repeated.
    assert job.json("result.json") == {"acc": expected_result(steps, 2), "steps": steps, "world": 2, "restarts": 2}
    log = job.log_text()  # --open-mode=append: all three runs in one file
    for k in (0, 1, 2):
        assert f"job={job.id} restart={k} " in log, log
    assert log.count(": requeueing job") == 2
    assert "batch shell got SIGUSR1, forwarding to srun" in log
    assert log.count("got SIGUSR1: checkpointed") == 4  # 2 ranks x 2 preemptions


@REAL_SLURM
def test_failing_entry_fails_without_requeue(slurm, tmp_path):
    job = Job(slurm, tmp_path, "fail", steps=5, extra_sets=["fail_at=2"])
    after = slurm.sbatch(["--dependency=afterok:%d" % job.id, "--wrap", "true"], cwd=tmp_path)
    assert job.wait() == "FAILED", job.log_text()
    info = job.info()
    assert info["ExitCode"] == "1:0" and info["Restarts"] == "0", info
    log = job.log_text()
    assert "srun exited with code 1" in log and "requeue" not in log
    assert not (job.out / "result.json").exists()
    # A job chained with afterok never starts.
    deadline = time.monotonic() + 30
    while slurm.job_info(after).get("Reason") != "DependencyNeverSatisfied" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.job_info(after)["Reason"] == "DependencyNeverSatisfied"
    assert slurm.state(after) == "PENDING"
    slurm.scancel(str(after))


@REAL_SLURM
def test_scancel_is_a_cancel_not_a_requeue(slurm, tmp_path):
    """`scancel JOB` sends SIGTERM: the trainer checkpoints and exits 42, yet the job must stay
    cancelled (Slurm would accept `scontrol requeue` for it)."""
    job = Job(slurm, tmp_path, "cancel", steps=1000, step_sleep=0.05, sbatch_args=["--ntasks-per-node=1"])
    job.wait_progress(restart=0, min_step=2)
    slurm.scancel(str(job.id))
    assert job.wait() == "CANCELLED", job.log_text()
    assert job.info()["Restarts"] == "0"
    assert job.json("state.json")["step"] >= 2  # it did checkpoint
    assert "while the job was being cancelled: not requeueing" in job.log_text()
