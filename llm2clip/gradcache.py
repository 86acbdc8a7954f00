"""Exact large contrastive batches in bounded activation memory (GradCache, Gao et al. 2021).

`train.contrastive_chunk` = c > 0: the task's local micro-batch is embedded c items at a time without
a graph; the loss (gathered over the global batch as without chunking) is built on leaf copies of the
embeddings and differentiated w.r.t. them; each chunk is then re-run with a graph and its slice of that
gradient back-propagated into the trainable parameters (torch.autograd.grad for all but the last chunk,
so nothing reaches `.grad` yet). The loss handed back to the engine is a surrogate whose backward returns
those summed parameter gradients and the last chunk's output gradients, scaled by the incoming gradient
(DeepSpeed's 1/grad_accum and loss scale): every parameter's gradient then arrives once per
`engine.backward`, as without chunking, so ZeRO-1/2's reduction hooks see an ordinary step. Peak
activation memory is one chunk's graph (see `chunked_loss` for why the last chunk is special).

ZeRO-3: the parameters are partitioned between forwards, so they cannot be inputs of the surrogate (their
shape there is the empty partition's). Each early chunk's re-run then goes through the engine and gets its
own `engine.backward` with the accumulation boundary off: DeepSpeed's gradient accumulation, which adds
the chunk's partitioned gradients into the step's; the last chunk rides on the caller's `engine.backward`
as above. Cost: one reduce-scatter of the trainable gradients per chunk instead of one per step (LoRA
gradients: r16 on an 8B model is ~42 MB in bf16 per chunk).

The CPU and CUDA RNG states are saved before each chunk's first pass and restored for its re-run, so
dropout draws the same masks twice; the RNG continues after the call as after the first pass.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

Outputs = Sequence[torch.Tensor]


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class _Surrogate(torch.autograd.Function):
    """value: the loss. Backward, scaled by its incoming gradient: the precomputed gradients of the early
    chunks to `params`, and the last chunk's output gradients to its outputs (still with their graph)."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, grads: list, last_grads: list, n_params: int, *tensors):
        ctx.grads, ctx.last_grads = grads, last_grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        scaled = [None if t is None else t * g.to(t.dtype) for t in ctx.grads + ctx.last_grads]
        return (None, None, None, None, *scaled)


def chunked_loss(engine, n: int, chunk: int, embed: Callable[[int, int, Callable], Outputs],
                 loss_fn: Callable[[list[Outputs]], tuple[torch.Tensor, dict]]) -> tuple[torch.Tensor, dict]:
    """GradCache over items [0, n) in chunks of `chunk`.

    engine: the DeepSpeed engine (or a plain module); its trainable parameters get the gradients.
    embed(i, j, forward): the outputs for items [i, j) computed with `forward` (the engine or its bare
    module), e.g. (image [j-i, E], text [j-i, E], scale []). loss_fn(per_chunk): the scalar loss and
    metrics from every chunk's outputs (leaf tensors); it may gather over ranks with gradient, as the
    unchunked loss does, and may ignore an output (e.g. use chunk 0's logit scale only).
    Returns (surrogate, metrics): the surrogate's value is the loss; `engine.backward(surrogate)` puts
    d loss / d param into the parameters' gradients, each parameter's once.

    Why the last chunk is special: DeepSpeed (>= 0.18) hooks the outputs of `engine(...)` to run its
    backward prologue and epilogue (gradient-accumulation boundary, reduction) around any backward that
    reaches them. The early chunks therefore run through the bare module and torch.autograd.grad (no
    hooks, nothing in `.grad`); the last chunk runs through the engine and keeps its graph until
    `engine.backward`, whose one backward pass then carries the early chunks' gradients too."""
    module = getattr(engine, "module", engine)
    zero3 = getattr(engine, "zero_optimization_stage", lambda: 0)() == 3
    params = [] if zero3 else [p for p in module.parameters() if p.requires_grad]
    bounds = [(i, min(n, i + chunk)) for i in range(0, n, chunk)]
    rng, leaves = [], []
    with torch.no_grad():
        for i, j in bounds:
            rng.append(_rng_state())
            leaves.append([o.detach().requires_grad_(o.is_floating_point()) for o in embed(i, j, module)])
    after = _rng_state()
    with torch.enable_grad():
        loss, metrics = loss_fn(leaves)
    flat = [t for outs in leaves for t in outs if t.requires_grad]
    # every rank differentiates together: the gathers' backward is collective
    gflat = iter(torch.autograd.grad(loss, flat, allow_unused=True))
    out_grads = [[next(gflat) if t.requires_grad else None for t in outs] for outs in leaves]
    acc: list[torch.Tensor | None] = [None] * len(params)
    last: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, ((i, j), state, grads) in enumerate(zip(bounds, rng, out_grads)):
        _set_rng_state(state)  # the re-run draws the first pass's dropout masks
        is_last = k == len(bounds) - 1
        with torch.enable_grad():
            outs = embed(i, j, engine if is_last or zero3 else module)
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        if is_last:
            last = pairs
        elif zero3 and pairs:
            # d/dθ sum(out * g) = g · d out/dθ; scaled by 1/grad_accum (and the loss scale) as the caller's
            # backward will be
            engine.set_gradient_accumulation_boundary(False)
            try:
                engine.backward(sum((o * g).sum() for o, g in pairs))
            finally:
                # None hands the boundary back to the engine's micro-step counter: DeepSpeed's initial state,
                # which the trainer never overrides
                engine.set_gradient_accumulation_boundary(None)
        elif pairs:
            gp = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
            acc = [a if g is None else (g if a is None else a + g) for a, g in zip(acc, gp)]
        del outs, pairs  # this chunk's graph is freed before the next one is built
    _set_rng_state(after)
    return _Surrogate.apply(loss.detach(), acc, [g for _, g in last], len(params), *params,
                            *[o for o, _ in last]), metrics
