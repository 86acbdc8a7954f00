"""Run under `torchrun --nproc_per_node 2`: distributed ClipLoss/SigLipLoss vs the global-batch loss.

    torchrun --standalone --nproc_per_node 2 tests/dist_scripts/clip_loss_equiv.py IN.npz OUT.npz

IN.npz holds a fixed global batch (raw image/text inputs) and the parameters of a small shared
linear layer. For each case, rank r takes its slice of the global batch, computes features
normalize(linear(x)), the loss and its backward; parameter gradients are then averaged over ranks
(what DDP/DeepSpeed do) and per-row input gradients gathered. Rank 0 writes OUT.npz; the test
compares it with the same computation in one process (`forward_backward` below, world size 1).
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

CASES = {  # name: (loss, local_loss, rows per rank)
    "clip_local_3_5": ("clip", True, (3, 5)),
    "clip_local_4_4": ("clip", True, (4, 4)),
    "clip_global_3_5": ("clip", False, (3, 5)),
    "siglip_3_5": ("siglip", True, (3, 5)),
    "siglip_4_4": ("siglip", True, (4, 4)),
}


def forward_backward(kind: str, local_loss: bool, x_img: np.ndarray, x_txt: np.ndarray, inp: dict) -> dict:
    """One forward/backward on the given rows (float64). Returns loss, input grads and param grads."""
    from llm2clip.losses import ClipLoss, SigLipLoss

    xi = torch.tensor(x_img, dtype=torch.float64, requires_grad=True)
    xt = torch.tensor(x_txt, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(inp["w"], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(inp["b"], dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(float(inp["log_scale"]), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(float(inp["bias"]), dtype=torch.float64, requires_grad=True)
    img = F.normalize(F.linear(xi, w, b), dim=-1)
    txt = F.normalize(F.linear(xt, w, b), dim=-1)  # the layer is shared by both sides
    if kind == "clip":
        loss = ClipLoss(local_loss=local_loss)(img, txt, log_scale.exp())
    else:
        loss = SigLipLoss()(img, txt, log_scale.exp(), bias)
    loss.backward()
    out = {"loss": loss.detach().numpy(), "g_img": xi.grad.numpy(), "g_txt": xt.grad.numpy(),
           "g_w": w.grad.numpy(), "g_b": b.grad.numpy(), "g_log_scale": log_scale.grad.numpy()}
    if kind == "siglip":
        out["g_bias"] = bias.grad.numpy()
    return out


def main() -> None:
    in_path, out_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    inp = dict(np.load(in_path))
    results: dict[str, np.ndarray] = {}
    for name, (kind, local_loss, sizes) in CASES.items():
        assert len(sizes) == world, f"case {name} needs {len(sizes)} ranks"
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        r = forward_backward(kind, local_loss, inp["x_img"][sl], inp["x_txt"][sl], inp)
        # Parameter grads: average over ranks, as the DDP/DeepSpeed engine does.
        for k in [k for k in r if k.startswith("g_") and k not in ("g_img", "g_txt")]:
            t = torch.from_numpy(np.ascontiguousarray(r[k])).clone()
            dist.all_reduce(t)
            results[f"{name}/{k}"] = (t / world).numpy()
        loss = torch.tensor(r["loss"]).clone()
        dist.all_reduce(loss)
        results[f"{name}/loss_mean"] = (loss / world).numpy()
        gathered = [None] * world
        dist.all_gather_object(gathered, (r["loss"], r["g_img"], r["g_txt"]))
        results[f"{name}/loss_per_rank"] = np.array([g[0] for g in gathered])
        results[f"{name}/g_img"] = np.concatenate([g[1] for g in gathered])
        results[f"{name}/g_txt"] = np.concatenate([g[2] for g in gathered])
    if rank == 0:
        np.savez(out_path, **results)
        print(f"wrote {len(results)} arrays to {out_path}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
