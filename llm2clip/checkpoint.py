"""Atomic, resumable checkpoints.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/            a complete checkpoint (renamed into place only once fully written)
        engine/               DeepSpeed engine state (model, optimizer, scheduler partitions)
        trainer_state.json    step, samples seen, config digest
        rank00000.json        per-rank data position and python/numpy RNG state
        rank00000.safetensors per-rank torch (CPU/CUDA) RNG state
        COMPLETE              written last, before the rename
    .step_00000200.tmp/       an interrupted save: ignored, removed by the next save
and `<output_dir>/run.lock`: the job that owns the directory (one at a time, see acquire_run_lock).

Rank 0 decides which checkpoint to resume from and broadcasts the path. Nothing is unpickled on
load: our files are JSON and safetensors, and DeepSpeed's own files are read with
`torch.load(weights_only=True)` (SafeTorchCheckpointEngine).
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm2clip import distributed as D
from llm2clip.config import atomic_write_text

log = logging.getLogger("llm2clip")
_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "COMPLETE").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    cks = list_checkpoints(root)
    return cks[-1] if cks else None


def resolve_resume(resume: str, output_dir: str) -> Path | None:
    """`auto` -> newest complete checkpoint (or None), `none` -> None, else an explicit folder.

    Rank 0 looks, everyone gets rank 0's answer (a shared file system may lag on other nodes).
    """
    choice: str | None = None
    if D.get_rank() == 0:
        if resume == "none":
            choice = None
        elif resume in ("auto", "latest"):
            lc = latest_checkpoint(checkpoint_root(output_dir))
            choice = str(lc) if lc else None
        else:
            p = Path(resume)
            if not (p / "COMPLETE").is_file():
                choice = f"ERROR:run.resume={resume!r} is not a complete checkpoint folder (no COMPLETE marker)"
            else:
                choice = str(p)
    choice = D.broadcast_object(choice)
    if choice and choice.startswith("ERROR:"):
        raise FileNotFoundError(choice[6:])
    return Path(choice) if choice else None


def step_dir(output_dir: str, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:08d}"


def tmp_dir_for(final: Path) -> Path:
    return final.parent / f".{final.name}.tmp"


def begin_save(output_dir: str, step: int) -> Path:
    """Create (fresh) the temporary folder all ranks write into; returns it on every rank."""
    final = step_dir(output_dir, step)
    tmp = tmp_dir_for(final)
    if D.get_rank() == 0:
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        check_run_lock(output_dir)  # leftovers are ours to clear only while no other job holds the directory
        for stale in root.glob(".step_*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    D.barrier()
    return tmp


def commit_save(tmp: Path, trainer_state: dict[str, Any], keep_last: int) -> Path:
    """After every rank wrote into `tmp`: rank 0 writes the metadata, marks complete, renames, prunes."""
    D.barrier()
    final = tmp.parent / tmp.name[1:-4]
    if D.get_rank() == 0:
        atomic_write_text(tmp / "trainer_state.json", json.dumps(trainer_state, indent=1, sort_keys=True))
        atomic_write_text(tmp / "COMPLETE", "ok\n")
        if final.exists():  # re-saving the same step (e.g. preempted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if keep_last > 0:
            for old in list_checkpoints(final.parent)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer_state.json").read_text())


# ---- per-rank state: data position + RNG -------------------------------------------------------

def save_rank_state(tmp: Path, rank: int, data_state: dict[str, Any]) -> None:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / f"rank{rank:05d}.safetensors"))
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "data": data_state,
        "python_rng": [py[0], list(py[1]), py[2]],
        "numpy_rng": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    atomic_write_text(tmp / f"rank{rank:05d}.json", json.dumps(meta))


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Restore RNGs; return the data state. A rank missing from the checkpoint (world size changed)
    gets an empty data state and keeps its fresh RNG."""
    jpath = ckpt / f"rank{rank:05d}.json"
    if not jpath.is_file():
        return {}
    meta = json.loads(jpath.read_text())
    tensors = load_file(str(ckpt / f"rank{rank:05d}.safetensors"))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    v, state, gauss = meta["python_rng"]
    random.setstate((v, tuple(state), gauss))
    n = meta["numpy_rng"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    return meta["data"]


# ---- DeepSpeed files without unpickling --------------------------------------------------------

def install_safe_loader(engine) -> None:
    """Make a DeepSpeed engine read its checkpoint files with torch.load(weights_only=True)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - re-raised with the file named
                raise RuntimeError(f"refusing to unpickle {path}: it holds objects beyond tensors and plain "
                                   f"containers ({e}). Was it written by llm2clip?") from e

    engine.checkpoint_engine = SafeTorchCheckpointEngine(engine._config)
    _allow_deepspeed_globals()


def _allow_deepspeed_globals() -> None:
    """DeepSpeed stores a few small enums/config objects in its state files; allow exactly those."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
        allowed += [LossScaler, DynamicLossScaler]
    except ImportError:
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum
        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
        allowed.append(fragment_address)
    except ImportError:
        pass
    import collections
    allowed += [collections.OrderedDict, set]
    torch.serialization.add_safe_globals(allowed)


# ---- one job per run directory -----------------------------------------------------------------

LOCK_NAME = "run.lock"


class RunDirLockedError(RuntimeError):
    """Another live job holds the run directory."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a recycled pid is not mistaken
    for the lock holder; None where /proc is absent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _proc_start(pid)
    return start is None or now is None or now == start


def _me() -> dict[str, Any]:
    import socket

    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _held_by_me(holder: dict[str, Any] | None, me: dict[str, Any]) -> bool:
    return bool(holder) and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]


def _takeover_reason(holder: dict[str, Any] | None, me: dict[str, Any], force: bool) -> str | None:
    """Why the lock `holder` wrote may be taken over by `me`; None if it may not."""
    if holder is None:
        return "the lock file is unreadable (a crash while writing it)"
    if _held_by_me(holder, me):
        return "this process holds it already"
    if holder.get("host") == me["host"]:
        # same host: the pid answers for itself; a live holder wins even within the same Slurm job
        if not _pid_alive(int(holder.get("pid", -1)), holder.get("pid_start")):
            return f"its process {holder.get('pid')} on {me['host']} is gone"
        return None
    # another host: its pid cannot be checked from here
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == me["slurm_job_id"]:
        return f"it belongs to this Slurm job ({me['slurm_job_id']}), requeued"
    if force:
        return "run.break_lock=true"
    return None


def acquire_run_lock(output_dir: str | os.PathLike, force: bool = False) -> Path:
    """Take `<output_dir>/run.lock` (host, pid, pid start time, Slurm job id) or raise RunDirLockedError.

    Call on one process per job (rank 0): the run directory sits on a shared filesystem. A lock is
    stale, and taken over, when its holder's pid is gone on this host, when it belongs to this same
    Slurm job id (a requeue: the old processes are gone), or when `force` (run.break_lock) says so."""
    path = Path(output_dir) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_run_lock(path)
            reason = _takeover_reason(holder, me, force)
            if reason is None:
                h = holder or {}
                job = f"Slurm job {h['slurm_job_id']}, " if h.get("slurm_job_id") else ""
                raise RunDirLockedError(
                    f"{path.parent} is in use by another job ({job}host {h.get('host')}, pid {h.get('pid')}, since "
                    f"{h.get('since')}); two jobs in one run directory would overwrite each other's checkpoints. "
                    f"Use another run.output_dir, stop that job, or, if it is gone (it ran on another host, so its "
                    f"pid cannot be checked from here), delete {path} or set run.break_lock=true") from None
            if _held_by_me(holder, me):
                return path
            log.warning(f"taking over {path} from {holder}: {reason}")
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
            f.flush()
            os.fsync(f.fileno())
        return path
    raise RunDirLockedError(f"{path}: could not take the lock (another job keeps taking it over)")


def read_run_lock(path: str | os.PathLike) -> dict[str, Any] | None:
    try:
        d = json.loads(Path(path).read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def release_run_lock(path: str | os.PathLike) -> None:
    """Remove the lock if this process still holds it (a job that took it over keeps it)."""
    if _held_by_me(read_run_lock(path), _me()):
        Path(path).unlink(missing_ok=True)


def check_run_lock(output_dir: str | os.PathLike) -> None:
    """Raise unless the run directory's lock is absent or ours: a save must not clear another job's files."""
    path = Path(output_dir) / LOCK_NAME
    holder = read_run_lock(path) if path.exists() else None
    if path.exists() and not _held_by_me(holder, _me()):
        raise RunDirLockedError(f"{path} is now held by {holder}, not by this job; not touching its checkpoints")
