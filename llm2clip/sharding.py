"""Work split over ranks and gathered back in input order (text embedding, image features, any
per-batch computation); a failure on any rank raises on every rank instead of leaving the others
blocked in a collective."""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import torch

from llm2clip import distributed as D

log = logging.getLogger("llm2clip")


def portable_error(error: BaseException | None) -> BaseException | None:
    """The exception itself if it survives pickling (so other ranks can raise the same type), else a
    RuntimeError carrying its message."""
    if error is None:
        return None
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def sharded_map(batches: Sequence[Sequence[int]], n: int,
                run_local: Callable[[list[list[int]]], Iterable[torch.Tensor]],
                desc: str = "", progress: bool = True) -> torch.Tensor:
    """Compute ``[n, D]`` rows batch by batch, the batches split round-robin over ranks.

    Args:
        batches: a partition of ``range(n)`` into batches; must be identical on every rank.
        run_local: given this rank's batches, yields one ``[len(batch), D]`` tensor per batch; it may
            do more work after its last batch (e.g. lockstep dummy passes), which is drained unused.
    Returns:
        ``[n, D]`` float32 on CPU, in input order, on every rank. Every rank makes the same
        collective calls whatever its share (possibly none); a failure on any rank raises everywhere.
    """
    world, rank = D.get_world_size(), D.get_rank()
    mine = [list(b) for b in batches[rank::world]]
    outs: list[torch.Tensor] = []
    err: BaseException | None = None
    bar = None
    if progress and rank == 0 and mine:
        from tqdm import tqdm

        bar = tqdm(total=len(mine), desc=desc, unit="batch", dynamic_ncols=True, leave=False)
    try:
        gen = iter(run_local(mine))
        for b, out in zip(mine, gen):
            out = out.detach().float().cpu()
            if out.shape[0] != len(b):
                raise RuntimeError(f"{desc}: a batch of {len(b)} gave {out.shape[0]} rows")
            outs.append(out)
            if bar is not None:
                bar.update(1)
        if len(outs) != len(mine):
            raise RuntimeError(f"{desc}: {len(mine)} batches planned but {len(outs)} computed")
        for _ in gen:  # extra passes the computation needs (collectives in lockstep)
            pass
    except Exception as e:  # made collective below
        err = e
    finally:
        if bar is not None:
            bar.close()
    if world == 1:
        if err is not None:
            raise err
        result = torch.cat(outs) if outs else torch.zeros(0, 0)
        order = torch.tensor([i for b in mine for i in b], dtype=torch.long)
        full = torch.empty_like(result)
        full[order] = result
        return full
    width = outs[0].shape[1] if outs else -1
    status = D.all_gather_object((portable_error(err), width))
    if err is not None:
        raise err
    for r, (e, _) in enumerate(status):
        if e is not None:
            log.warning(f"{desc} failed on rank {r}")
            raise e
    width = max(w for _, w in status)
    dev = D.collective_device()
    local = torch.cat(outs) if outs else torch.zeros(0, width)
    idx = torch.tensor([i for b in mine for i in b], dtype=torch.long)
    feats = D.gather_no_grad(local.to(dev)).cpu()
    order = D.gather_no_grad(idx.to(dev)).cpu()
    if order.numel() != n or not torch.equal(order.sort().values, torch.arange(n)):
        raise RuntimeError(f"{desc}: gathered rows do not cover 0..{n - 1} exactly once")
    full = torch.empty(n, width)
    full[order] = feats
    return full
