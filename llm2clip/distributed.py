"""World discovery and collectives that work the same on 1 CPU process and on 512 GPUs.

Rank, world size and local rank come from torchrun (RANK/WORLD_SIZE/LOCAL_RANK) or Slurm
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) alike; MASTER_ADDR/MASTER_PORT come from the environment
(the launchers in slurm/ set them from the allocation). gloo on CPU, NCCL on GPU.
"""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Exit code meaning "checkpointed after a preemption signal, please requeue me" (see slurm/_common.sh).
REQUEUE_EXIT_CODE = 42


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "none"  # "torchrun" | "slurm" | "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a Slurm node list, via scontrol when present, else a small parser."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^\[,]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def world_info(env: dict[str, str] | None = None) -> WorldInfo:
    """Read rank/world/local rank from torchrun or Slurm variables (torchrun wins when both exist)."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        ntasks_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_ws = int(ntasks_node) if ntasks_node.isdigit() else int(env["SLURM_NTASKS"])
        return WorldInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), local_ws, "slurm")
    return WorldInfo()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_minutes: float = 30.0, single_process_group: bool = False) -> WorldInfo:
    """Initialise torch.distributed from the environment.

    A single process gets a 1-rank group only when `single_process_group` (DeepSpeed needs one);
    otherwise that case is a no-op.

    Sets MASTER_ADDR from the Slurm node list and MASTER_PORT from the job id when the launcher did
    not; binds the CUDA device to the local rank.
    """
    info = world_info()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % max(torch.cuda.device_count(), 1))
    if dist.is_available() and dist.is_initialized():
        return info
    if info.world_size == 1:
        if not single_process_group:
            return info
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)
    if info.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # the same rule as slurm/_common.sh: 20000-29999, clear of service ports and of the ephemeral range
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 10000))
        os.environ.setdefault("RANK", str(info.rank))
        os.environ.setdefault("WORLD_SIZE", str(info.world_size))
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
    return info


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src` decides, everyone receives (e.g. the checkpoint path to resume from)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max(value: float | int, device: torch.device | None = None) -> float:
    """Max of a scalar over ranks (used to agree on stop/preempt flags)."""
    if not is_dist():
        return value
    t = torch.tensor([float(value)], device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        t = t.clone()
        dist.all_reduce(t)
    return t


def sum_counters(local: dict[str, Any]) -> dict[str, float]:
    """Sum numeric counters over ranks, key by key (ranks may know different keys: a reason counted
    only once it happens). One all_gather of a small dict: call it per log step, not per batch.
    Collective: every rank must call it."""
    tot: dict[str, float] = {}
    for d in all_gather_object({k: v for k, v in local.items() if isinstance(v, (int, float))
                                and not isinstance(v, bool)}):
        for k, v in d.items():
            tot[k] = tot.get(k, 0) + v
    return tot


def collective_device() -> torch.device:
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def row_counts(n_local: int, device: torch.device | None = None) -> list[int]:
    """Rows each rank holds, in rank order (one small all_gather). Compute it once per loss and pass it to
    the gathers and `local_offset` below, which otherwise each exchange the counts again."""
    if not is_dist():
        return [n_local]
    device = device or collective_device()
    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(out, torch.tensor([n_local], dtype=torch.long, device=device))
    return [int(t.item()) for t in out]


def _gather_rows(x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    out = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:n] for o, n in zip(out, counts)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the summed gradient.

    Every rank computes a loss over the gathered batch; the true gradient w.r.t. the local rows
    is the sum over ranks of d(loss_r)/d(rows), hence the all_reduce in backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:  # type: ignore[override]
        ctx.counts, ctx.rank = counts, dist.get_rank()
        return _gather_rows(x, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start: start + ctx.counts[ctx.rank]], None


def gather_with_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Concatenate `x` [n_local, ...] from all ranks in rank order -> [sum n, ...], differentiable.

    Ranks may hold different row counts (the last batch of an epoch); pass `counts` from `row_counts`
    when you already have them. Single process: returns x.
    """
    if not is_dist() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, counts or row_counts(x.shape[0], x.device))


def gather_no_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Like gather_with_grad but detached (evaluation features, metrics)."""
    if not is_dist() or get_world_size() == 1:
        return x
    with torch.no_grad():
        return _gather_rows(x.detach(), counts or row_counts(x.shape[0], x.device))


def local_offset(n_local: int, counts: list[int] | None = None) -> int:
    """Index of this rank's first row inside a gathered batch (labels for the local-loss form)."""
    if not is_dist():
        return 0
    return sum((counts or row_counts(n_local))[: get_rank()])


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
