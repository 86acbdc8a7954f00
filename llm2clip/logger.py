"""Console + TensorBoard metrics, rank 0 only, plus a JSONL copy that tests and tools can read."""
from __future__ import annotations

import json
import logging
import os
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


def progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not (enabled and D.get_rank() == 0),
                dynamic_ncols=True, file=sys.stdout, mininterval=1.0 if os.environ.get("CI") else 0.1)
