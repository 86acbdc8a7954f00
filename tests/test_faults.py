"""Fault handling: counters from every rank, preflight before any model loads, non-finite steps named
and skippable, one job per run directory, metrics rows after a resume."""
import json
import tarfile

import pytest

from tests.helpers import ROOT, read_metrics, torchrun
from tests.test_stage2 import TRAIN as TRAIN2, stage2_args


# ---- non-finite steps --------------------------------------------------------------------------

NONFINITE = str(ROOT / "tests/dist_scripts/nonfinite_task.py")


def _weights(out: str, rank: int) -> dict[int, list[float]]:
    """'rank R: weights CALL [..]' lines -> {call: weights seen before that step}."""
    import re
    return {int(m.group(1)): json.loads(m.group(2))
            for m in re.finditer(rf"rank {rank}: weights (\d+) (\[[^\]]*\])", out)}


def test_nonfinite_fail_names_step_rank_inputs_and_keys(tmp_path):
    """A NaN input on rank 1 at step 3 stops both ranks (no hang) with one message naming the step, rank 1,
    its non-finite input and the batch's first sample keys."""
    p = torchrun(NONFINITE, [str(tmp_path / "run"), "fail"], timeout=120, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    want = ("NonFiniteError: non-finite loss at step 3: rank 1 (local loss nan; non-finite inputs: x; first sample "
            "keys: r1-b3-0, r1-b3-1, r1-b3-2, r1-b3-3); the other 1 rank(s) were finite")
    assert f"rank 0: {want}" in out and f"rank 1: {want}" in out, out[-3000:]


def test_nonfinite_skip_discards_the_step_and_goes_on(tmp_path):
    """on_nonfinite=skip: step 3 (NaN input on rank 1) and step 5 (finite losses, NaN gradient on rank 1)
    change no weight on either rank, the other steps train; both skips are named and counted in
    metrics.jsonl, and the counters of both ranks are summed (rank r counts r + 1 per batch)."""
    run = tmp_path / "run"
    p = torchrun(NONFINITE, [str(run), "skip"], timeout=120, check=False)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert "skipped (train.on_nonfinite=skip, 1 in a row, 1 in all): non-finite loss at step 3: rank 1" in out
    assert ("skipped (train.on_nonfinite=skip, 1 in a row, 2 in all): non-finite gradient at step 5 (every rank's "
            "loss was finite): rank 0 (first sample keys: r0-b5-0, r0-b5-1, r0-b5-2, r0-b5-3), rank 1 (first sample "
            "keys: r1-b5-0") in out, out[-3000:]
    for r in (0, 1):
        w = _weights(out, r)
        assert len(w) == 7
        assert w[4] == w[3] and w[6] == w[5], "the skipped steps 3 and 5 must leave the weights untouched"
        assert w[3] != w[2] and w[5] != w[4] and w[7] != w[6], "steps 2, 4 and 6 are applied"
    last = [m for m in read_metrics(run) if "train/loss" in m][-1]
    assert last["step"] == 7 and last["train/skipped_steps"] == 2
    assert last["data/toy_count"] == 7 * 1 + 7 * 2
    assert not (run / "run.lock").exists()  # released at the end


@pytest.mark.slow
def test_nonfinite_skip_fails_after_too_many_in_a_row(tmp_path):
    p = torchrun(NONFINITE, [str(tmp_path / "run"), "skip_always"], timeout=120, check=False)
    out = p.stdout + p.stderr
    assert p.returncode != 0
    assert ("rank 0: NonFiniteError: non-finite loss at step 5: rank 1" in out
            and "3 non-finite steps in a row (train.max_consecutive_skips=2)" in out), out[-3000:]
    assert _weights(out, 0)[5] == _weights(out, 0)[3]


def test_skip_needs_zero_1_or_2():
    from llm2clip.config import ConfigError
    from llm2clip.ds_config import build_ds_config
    from llm2clip.schema import OptimConfig, TrainConfig
    t = TrainConfig(deepspeed_config="ds_configs/zero3_bf16.json", on_nonfinite="skip", precision="bf16")
    with pytest.raises(ConfigError, match=r"train.on_nonfinite=skip needs ZeRO stage 1 or 2"):
        build_ds_config(t, OptimConfig(), 1)
    t.zero_stage = 2
    assert build_ds_config(t, OptimConfig(), 1)["bf16"]["check_grad_overflow"] is True


# ---- one job per run directory -----------------------------------------------------------------

def _lock(tmp_path, **fields):
    import os
    import socket
    me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "slurm_job_id": "", "since": "x"}
    (tmp_path / "run.lock").write_text(json.dumps({**me, **fields}))


def test_run_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from llm2clip import checkpoint as C
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    # a live process on this host holds it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock(tmp_path, pid=live.pid, pid_start=C._proc_start(live.pid))
        with pytest.raises(C.RunDirLockedError, match=rf"in use by another job \(host .*, pid {live.pid}"):
            C.acquire_run_lock(tmp_path)
        # ... and a save in that directory must not clear its temporary checkpoint folders
        (tmp_path / "checkpoints/.step_00000007.tmp").mkdir(parents=True)
        with pytest.raises(C.RunDirLockedError):
            C.begin_save(str(tmp_path), 8)
        assert (tmp_path / "checkpoints/.step_00000007.tmp").is_dir()
    finally:
        live.kill()
        live.wait()
    # the same pid is gone now: stale, taken over
    path = C.acquire_run_lock(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    C.release_run_lock(path)
    assert not path.exists()
    # a recycled pid (alive, but started at another time) is not the holder
    _lock(tmp_path, pid=os.getppid(), pid_start="1")
    C.release_run_lock(C.acquire_run_lock(tmp_path))


def test_run_lock_on_another_host_needs_the_same_slurm_job_or_break_lock(tmp_path, monkeypatch):
    from llm2clip import checkpoint as C
    _lock(tmp_path, host="node-elsewhere", pid=12345, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(C.RunDirLockedError, match=r"Slurm job 777, host node-elsewhere.*run.break_lock=true"):
        C.acquire_run_lock(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued: the old processes are gone
    C.release_run_lock(C.acquire_run_lock(tmp_path))
    _lock(tmp_path, host="node-elsewhere", pid=12345, slurm_job_id="777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    C.release_run_lock(C.acquire_run_lock(tmp_path, force=True))


@pytest.mark.slow
def test_second_job_on_a_run_directory_exits_at_once(tmp_path):
    """While one training job holds the directory (a live process on this host), a second exits before
    loading anything, naming the holder; the run directory's files are left alone."""
    import subprocess
    import sys
    import time
    from tests.helpers import run_cmd
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        from llm2clip import checkpoint as C
        _lock(run, pid=holder.pid, pid_start=C._proc_start(holder.pid))
        t0 = time.time()
        p = run_cmd([sys.executable, NONFINITE, str(run), "skip"], check=False, timeout=120)
        assert p.returncode != 0 and time.time() - t0 < 60
        assert f"pid {holder.pid}" in p.stdout + p.stderr and "is in use by another job" in p.stdout + p.stderr
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


# ---- preflight ---------------------------------------------------------------------------------

def test_preflight_reports_every_bad_path_before_training(tiny_world, tmp_path):
    """A validation glob matching nothing, a missing DeepSpeed JSON, a model folder without config.json and
    an unwritable output directory: one error, in seconds, naming each key and path; nothing trained."""
    import sys
    import time
    from tests.helpers import run_cmd
    w = tiny_world
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    args = stage2_args(w, tmp_path / "emb", tmp_path / "ro/run",
                       "--set", "data.val_shards=/nonexistent/*.tar", "--set", "train.eval_every=0",
                       "--set", "train.deepspeed_config=/nonexistent/ds.json",
                       "--set", f"vision.path={tmp_path / 'not_a_model'}")
    t0 = time.time()
    p = run_cmd([sys.executable, TRAIN2, *args], check=False, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode != 0 and time.time() - t0 < 60
    assert "problem(s) found before loading any model" in out, out[-3000:]
    assert "data.val_shards: /nonexistent/*.tar: matches no file" in out
    assert "train.deepspeed_config: " in out and "/nonexistent/ds.json" in out
    assert f"vision.path: {tmp_path / 'not_a_model'}: no config.json" in out
    assert "data.shards (sidecars: data.sidecar): 4 of 4 shards have no complete sidecar" in out  # empty emb dir
    assert "Traceback" not in out
    import os
    if os.geteuid() != 0:  # root writes anywhere
        assert f"run.output_dir: {tmp_path / 'ro/run'}: not writable" in out
    assert not (tmp_path / "ro/run/checkpoints").exists()


def _tar(path, samples):
    """samples: [(key, {ext: bytes})] written in the given order."""
    import io
    with tarfile.open(path, "w") as tf:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))


def test_preflight_names_caption_fields_no_shard_has(tiny_world, tmp_path):
    """Stage-1 val_fields default json:short_alt, which img2dataset never writes: named with each shard's fields."""
    from llm2clip.config import load_config
    from llm2clip.preflight import find_problems
    from llm2clip.schema import Stage1Config
    j = json.dumps({"caption": "a cat", "url": "http://x/1.jpg", "status": "success"}).encode()
    _tar(tmp_path / "00000.tar", [("000000001", {"jpg": b"x", "txt": b"a cat", "json": j})])
    _tar(tmp_path / "00001.tar", [])  # every download failed
    cfg = load_config(Stage1Config, None, [
        f"text.model_path={tiny_world['llama']}", f"run.output_dir={tmp_path / 'run'}",
        f"data.sources=[{{path: '{tmp_path}/0000*.tar', fields: [txt, 'json:dense']}}]",
        f"data.val_path={tmp_path}/0000*.tar", "train.deepspeed_config=ds_configs/zero1_bf16.json"])
    probs = find_problems(cfg)
    by_key = {k: (p, w) for k, p, w in probs}
    assert set(by_key) == {"data.val_fields", "data.sources[0].fields"}, probs
    path, what = by_key["data.val_fields"]
    assert path == "json:short_alt"
    assert "00000.tar: json:caption, json:status, json:url, txt" in what and "00001.tar: (empty shard)" in what
    assert "1 of these fields exist" in by_key["data.sources[0].fields"][1]


# ---- metrics after a resume --------------------------------------------------------------------

def test_metrics_rows_of_replayed_steps_are_replaced(tmp_path):
    """A run logged steps 1..10 (and a half-written line) but checkpointed at 6: the resumed run replays 7..10
    and each step keeps one row, in metrics.jsonl and in TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from llm2clip.logger import MetricLogger
    first = MetricLogger(str(tmp_path), tensorboard=True)
    for s in range(1, 11):
        first.log(s, {"train/loss": 1.0})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "train/lo')  # killed mid-line
    second = MetricLogger(str(tmp_path), tensorboard=True, resume_step=6)
    for s in range(7, 11):
        second.log(s, {"train/loss": 2.0})
    second.log(10, {})  # an empty evaluation writes no row
    second.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["train/loss"] for r in rows] == [1.0] * 6 + [2.0] * 4
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(s, 1.0 if s <= 6 else 2.0) for s in range(1, 11)]
    MetricLogger(str(tmp_path), tensorboard=False, resume_step=0).close()  # a fresh start keeps nothing
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_jsonl_error_reads_once(tmp_path):
    from llm2clip.eval.readers import AnnotationError, _iter_jsonl
    p = tmp_path / "a.jsonl"
    p.write_text('{"image": "a.jpg"}\n{"image": "b.jpg", "caption": "never closed')
    with pytest.raises(AnnotationError) as e:
        list(_iter_jsonl(str(p)))
    assert f"{p}:2: invalid JSON (Unterminated string starting at: column 31)" in str(e.value), str(e.value)
