"""Run under torchrun: stage-1 InfoNCE with gathered negatives vs the single-process global loss.

Writes per-rank JSON: loss, grads w.r.t. local q/p/n rows and w.r.t. a shared linear layer
(averaged over ranks as data-parallel training does)."""
import json
import sys

import torch
import torch.distributed as dist

from llm2clip import distributed as D
from llm2clip.losses.infonce import infonce_loss, text_ids

out = sys.argv[1]
D.init_distributed()
rank, world = D.get_rank(), D.get_world_size()
torch.manual_seed(0)
N, d = 8, 6
x = torch.randn(3 * N, d)  # the same global batch on every rank: q rows, p rows, n rows
lin = torch.nn.Linear(d, d)
texts = [f"t{i % 5}" for i in range(N)]  # duplicates -> identical-caption masking kicks in
negs = [f"n{i % 3}" for i in range(N)]
sizes = [3, 5]  # unequal local batches
lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
q_in, p_in, n_in = [x[k * N + lo:k * N + hi].clone().requires_grad_(True) for k in range(3)]
loss, _ = infonce_loss(lin(q_in), lin(p_in), lin(n_in), 0.05, text_ids(texts[lo:hi]), text_ids(negs[lo:hi]))
# the data-parallel objective is the mean of per-rank losses weighted by local batch share
(loss * (hi - lo) / N * world).backward()
g = torch.cat([p.grad.flatten() for p in lin.parameters()])
dist.all_reduce(g)
g /= world
json.dump({"loss": float(loss), "n_local": hi - lo, "lin_grad": g.tolist(),
           "q_grad": q_in.grad.tolist(), "p_grad": p_in.grad.tolist(), "n_grad": n_in.grad.tolist()},
          open(f"{out}/rank{rank}.json", "w"))
D.cleanup()
