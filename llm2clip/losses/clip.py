"""Contrastive image-text losses in the distributed local-loss form.

Both losses take L2-normalised features of this rank's rows, `image [n, E]` and `text [n, E]`, plus
`logit_scale` = exp(log-scale) (a scalar tensor), and return a scalar.

Normalisation convention (both losses). With W ranks holding n_r rows each (N = sum n_r), each rank
returns its *share* of the global-batch loss scaled so that **the mean over ranks equals the loss a
single process would compute on the whole global batch**:

    loss_r = (W / N) * sum_{i in rank r} l_i         (global loss = (1 / N) * sum_i l_i)

With equal local batches W / N = 1 / n_r, i.e. the plain local mean (open_clip's local loss; the
SigLIP paper's "normalise by the local batch size"). With unequal batches (the last batch of an
epoch) the W / N factor keeps the DDP/DeepSpeed gradient exact. Consequences:
- The value one rank returns is not the global loss; all-reduce-average it for logging.
- Gradients w.r.t. parameters, after the engine averages them over ranks, equal the single-process
  gradients of the global loss. Gradients w.r.t. the *local features themselves* are W x the
  single-process ones (gather_with_grad sums the contributions of all ranks in backward; DDP's
  average divides by W again). tests/test_clip_loss_dist.py checks all of this on 2 gloo ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip.distributed import gather_no_grad, gather_with_grad, get_world_size, is_dist, local_offset, row_counts


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # Logits of a large global batch in bf16/fp16 lose the ranking; compute the loss in fp32 (keep fp64).
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _gather(x: torch.Tensor, counts: list[int], offset: int, with_grad: bool) -> torch.Tensor:
    """[n_local, E] -> [N, E] in rank order. Without grad, this rank's rows keep their autograd graph."""
    if with_grad:
        return gather_with_grad(x, counts)
    allx = gather_no_grad(x, counts)
    return torch.cat([allx[:offset], x, allx[offset + x.shape[0]:]], dim=0)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, labels on the diagonal.

    local_loss=True: this rank scores its n rows against all N gathered columns ([n, N] logits, memory
    linear in the global batch). local_loss=False: every rank builds the full [N, N] logits (same
    value on every rank; for checking). gather_with_grad=False gathers other ranks' features without
    gradient (cheaper, not the exact global gradient). Single process: the ordinary CLIP loss.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """image_features, text_features [n, E] normalised; logit_scale scalar (already exp'd) -> scalar.

        `logit_bias` is accepted (so `loss(*model(...))` works for a model with a bias) and ignored:
        a constant shift does not change a softmax.
        """
        img, txt, scale = _upcast(image_features), _upcast(text_features), _upcast(logit_scale)
        n = img.shape[0]
        if txt.shape[0] != n:
            raise ValueError(f"ClipLoss: {n} image rows but {txt.shape[0]} text rows")
        world = get_world_size() if is_dist() else 1
        if world == 1:
            logits = scale * img @ txt.t()
            labels = torch.arange(n, device=img.device)
            return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
        counts = row_counts(n, img.device)  # once; both gathers and the offset reuse it
        offset = local_offset(n, counts)
        all_img = _gather(img, counts, offset, self.gather_with_grad)
        all_txt = _gather(txt, counts, offset, self.gather_with_grad)
        big_n = all_img.shape[0]
        if self.local_loss:
            labels = torch.arange(offset, offset + n, device=img.device)
            li = F.cross_entropy(scale * img @ all_txt.t(), labels, reduction="sum")
            lt = F.cross_entropy(scale * txt @ all_img.t(), labels, reduction="sum")
            return 0.5 * (li + lt) * (world / big_n)
        # Full logits on every rank: each rank already holds the global loss; the mean over ranks is it.
        logits = scale * all_img @ all_txt.t()
        labels = torch.arange(big_n, device=img.device)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss (Zhai et al. 2023): -sum_ij log sigmoid(z_ij * (t * x_i . y_j + b)) / N.

    z_ij = +1 for matching pairs, -1 otherwise. Distributed: this rank's images against all texts
    gathered with gradient (one all_gather instead of the paper's ring of W-1 permutes: same loss,
    simpler, [n, N] logits), normalised by W / N (= 1 / local batch when batches are equal, as in the
    paper's chunked implementation; exact global gradients when they are not; see module docstring).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """image_features, text_features [n, E] normalised; logit_scale (exp'd), logit_bias scalars -> scalar."""
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias: build the model with logit_bias=True")
        img, txt = _upcast(image_features), _upcast(text_features)
        scale, bias = _upcast(logit_scale), _upcast(logit_bias)
        n = img.shape[0]
        if txt.shape[0] != n:
            raise ValueError(f"SigLipLoss: {n} image rows but {txt.shape[0]} text rows")
        world = get_world_size() if is_dist() else 1
        counts = row_counts(n, img.device) if world > 1 else [n]
        offset = local_offset(n, counts) if world > 1 else 0
        all_txt = gather_with_grad(txt, counts) if world > 1 else txt
        big_n = all_txt.shape[0]
        logits = scale * img @ all_txt.t() + bias
        signs = -torch.ones_like(logits)
        idx = torch.arange(n, device=img.device)
        signs[idx, idx + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() * (world / big_n)
