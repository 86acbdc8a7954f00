"""Atomic, resumable checkpoints.

Layout under `<output_dir>/checkpoints/`:
    step_00000100/            a complete checkpoint (renamed into place only once fully written)
        engine/               DeepSpeed engine state (model, optimizer, scheduler partitions)
        trainer_state.json    step, samples seen, config digest
        rank00000.json        per-rank data position and python/numpy RNG state
        rank00000.safetensors per-rank torch (CPU/CUDA) RNG state
        COMPLETE              written last, before the rename
    .step_00000200.tmp/       an interrupted save: ignored, removed by the next save

Rank 0 decides which checkpoint to resume from and broadcasts the path. Nothing is unpickled on
load: our files are JSON and safetensors, and DeepSpeed's own files are read with
`torch.load(weights_only=True)` (SafeTorchCheckpointEngine).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm2clip import distributed as D
from llm2clip.config import atomic_write_text

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
