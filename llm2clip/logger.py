"""Console + TensorBoard metrics, rank 0 only, plus a JSONL copy that tests and tools can read."""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from llm2clip import distributed as D


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    log = logging.getLogger("llm2clip")
    if not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter(f"[%(asctime)s r{D.world_info().rank}] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(level if D.world_info().rank == 0 else logging.WARNING)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    # third-party chatter (load reports, DeepSpeed config dumps) hides what matters
    for name in ("transformers", "DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    return log


class MetricLogger:
    """Writes scalars to TensorBoard (`<run>/tb`) and `<run>/metrics.jsonl` on rank 0.

    `resume_step`: the step training (re)starts from. Rows an interrupted run wrote after it are about to be
    replayed, so they are dropped from metrics.jsonl and purged from TensorBoard: each step has one set of
    rows, from the run whose weights the checkpoints hold. A fresh start (0) drops every old row."""

    def __init__(self, run_dir: str, tensorboard: bool = True, resume_step: int = 0):
        self.enabled = D.get_rank() == 0
        self.tb = None
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._drop_replayed(resume_step)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else 0)

    def _drop_replayed(self, resume_step: int) -> None:
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill: it will be replayed as well
                continue
            if resume_step and row.get("step", 0) <= resume_step:
                keep.append(line + "\n")
        from llm2clip.config import atomic_write_text

        atomic_write_text(self.path, "".join(keep))

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
        if not clean:  # e.g. an evaluation with nothing to evaluate
            return
        if self.tb is not None:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def peak_memory_gib() -> float:
    """Peak accelerator memory on GPU; peak resident memory of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except (ImportError, OSError):
        return 0.0


def cores_per_rank(me: tuple[str, list[int]], everyone: list[tuple[str, list[int]]]) -> float:
    """CPU cores a rank may use: its affinity mask's cores, split among the ranks on its host whose masks
    overlap it (`me`, `everyone`: (host, cores) per rank). torchrun's ranks inherit one mask and share
    it (the count is LOCAL_WORLD_SIZE); ranks that srun bound to their own --cpus-per-task cores have
    them to themselves."""
    mine = set(me[1])
    sharing = sum(1 for host, cores in everyone if host == me[0] and mine & set(cores))
    return len(mine) / max(1, sharing)


def rank_cores() -> float:
    """`cores_per_rank` of this rank (os.cpu_count() cores where there is no affinity mask). Collective:
    one all_gather, every rank calls it once."""
    try:
        mask = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mask = list(range(os.cpu_count() or 1))
    me = (socket.gethostname(), mask)
    return cores_per_rank(me, D.all_gather_object(me))


_MIN_SPARE = 0.1  # cores: a rank with one core is not warned about a trickle of loading
_WORSE = 1.25  # warn again when the loader's cores grow this much over the last warning's figure


def loader_cpu_metrics(cpu_s: float, steps: int, wall_s: float, cores: float,
                       warned_cores: float = 0.0) -> tuple[dict[str, float], str | None]:
    """perf/loader_* of one log window: `cpu_s` CPU seconds the task's loader spent outside the training
    thread (the window's delta of `loader_cpu_s()`), over `steps` steps and `wall_s` seconds, on a rank
    with `cores` cores (`rank_cores`). Returns the row and, when the loader keeps more cores busy than the
    rank can spare (cores - 1: the training process needs one) and more than 1.25x `warned_cores` (the
    figure of the last warning, 0 before any), a one-line warning."""
    cpu_s = max(0.0, cpu_s)  # a restarted loader (fresh workers) starts its count again
    per_step = cpu_s / max(1, steps)
    busy = cpu_s / wall_s if wall_s > 0 else 0.0
    row = {"perf/loader_cpu_s_per_step": per_step, "perf/loader_cores": busy,
           "perf/loader_core_frac": busy / cores if cores > 0 else 0.0}
    spare = max(cores - 1.0, _MIN_SPARE)
    if busy <= spare or busy <= _WORSE * warned_cores:
        return row, None
    return row, (f"data loader is CPU-bound: its workers kept {busy:.2f} cores busy ({per_step:.3f} CPU s per "
                 f"step) but this rank has {cores:g} cores and can spare {spare:g} (one runs training), so "
                 "loading takes CPU from the step (perf/data_wait_frac does not show it); use fewer "
                 "data.num_workers, smaller source images or pre-resized shards, or give each GPU more CPU "
                 "cores")


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and D.get_rank() == 0),
                dynamic_ncols=True, file=sys.stdout, mininterval=1.0 if os.environ.get("CI") else 0.1)
