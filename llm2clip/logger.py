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
    """Writes scalars to TensorBoard (`<run>/tb`) and `<run>/metrics.jsonl` on rank 0."""

    def __init__(self, run_dir: str, tensorboard: bool = True):
        self.enabled = D.get_rank() == 0
        self.tb = None
        self.path = Path(run_dir) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
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
