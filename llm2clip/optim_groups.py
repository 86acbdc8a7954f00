"""AdamW parameter groups: per-part learning rates, weight-decay exclusions, layer-wise lr decay.

    groups = param_groups_for_llm2clip(model, tower_lr=1e-5, head_lr=1e-5, adapter_lr=1e-5,
                                       weight_decay=0.05, layer_decay=0.85)
    opt = torch.optim.AdamW(groups)

Every group carries:
  "lr"           = base_lr * lr_scale (the learning rate at schedule factor 1.0),
  "base_lr"      = the part's learning rate,
  "lr_scale"     = the layer-decay factor (1.0 outside the tower's blocks/stem),
  "weight_decay" = weight_decay or 0.0,
  "group_name"   = e.g. "tower.layer3.decay" (for logging).
A scheduler sets `g["lr"] = g["base_lr"] * g["lr_scale"] * factor(step)` (torch's LambdaLR does the
same from the initial "lr").

Layer-wise decay over L tower blocks: block i (0 = input side) gets decay^(L - i), the stem
(patch/position embeddings, class token, pre-norm) decay^(L + 1), everything after the last block
(post-norm, pooling head, pretrained projection) 1.0.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

# Parameters that never get weight decay besides biases and every <= 1-D tensor (norm weights...).
NO_DECAY_PATTERNS = (r"(^|\.)logit_scale$", r"(^|\.)logit_bias$", r"position_embedding", r"pos_embed",
                     r"class_embedding", r"cls_token", r"reg_token", r"dist_token", r"(^|\.)probe$")

NamedParams = Iterable[tuple[str, nn.Parameter]]


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """True for biases, 1-D params (norms, class token), logit scale/bias, position/class embeddings."""
    if param.ndim <= 1 or name.endswith(".bias") or name == "bias":
        return True
    return any(re.search(p, name) for p in NO_DECAY_PATTERNS)


def build_param_groups(named_params_by_part: dict[str, NamedParams], lr: dict[str, float], weight_decay: float,
                       layer_decay: float = 1.0, layer_id_fn: Callable[[str, str], int | None] | None = None,
                       num_layers: int = 0) -> list[dict]:
    """Group trainable parameters for AdamW.

    named_params_by_part: {part: [(name, param), ...]}, e.g. parts "tower", "visual_proj", "adapter",
      "logit_scale". Parameters with requires_grad=False are skipped. A parameter object listed twice
      (shared weights) is kept once, in the first part that lists it.
    lr: {part: learning rate}; every part must have one.
    layer_id_fn(part, name) -> layer id in [0, num_layers + 1] for layer-decayed parameters, or None
      for "no layer decay" (scale 1.0). Scale = layer_decay ** (num_layers + 1 - layer_id).
    Returns non-empty groups, each with params, lr, base_lr, lr_scale, weight_decay, group_name.
    """
    missing = [p for p in named_params_by_part if p not in lr]
    if missing:
        raise ValueError(f"no learning rate for part(s) {missing}; lr has {sorted(lr)}")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    groups: dict[tuple[str, int | None, bool], dict] = {}
    seen: set[int] = set()
    for part, named in named_params_by_part.items():
        for name, p in named:
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            layer = layer_id_fn(part, name) if layer_id_fn is not None else None
            if layer is not None and not 0 <= layer <= num_layers + 1:
                raise ValueError(f"layer_id_fn gave layer {layer} for {part}:{name}, outside [0, {num_layers + 1}]")
            no_decay = is_no_decay(name, p)
            key = (part, layer, no_decay)
            if key not in groups:
                scale = 1.0 if layer is None else layer_decay ** (num_layers + 1 - layer)
                tag = f"{part}" + ("" if layer is None else f".layer{layer}") + (".no_decay" if no_decay else ".decay")
                groups[key] = {"params": [], "lr": lr[part] * scale, "base_lr": lr[part], "lr_scale": scale,
                               "weight_decay": 0.0 if no_decay else weight_decay, "group_name": tag}
            groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def param_groups_for_llm2clip(model: nn.Module, tower_lr: float, head_lr: float, adapter_lr: float,
                              weight_decay: float, layer_decay: float = 1.0,
                              logit_scale_lr: float | None = None) -> list[dict]:
    """Groups for an LLM2CLIPModel: tower (layer-decayed), visual_proj (head_lr), adapter, logit scale/bias.

    logit_scale_lr defaults to head_lr. Parameters outside these parts raise (nothing is silently
    left out of the optimizer).
    """
    tower = model.tower
    parts: dict[str, list[tuple[str, nn.Parameter]]] = {"tower": [], "visual_proj": [], "adapter": [], "logit_scale": []}
    for name, p in model.named_parameters():
        head = name.split(".", 1)[0]
        if head == "tower":
            parts["tower"].append((name.split(".", 1)[1], p))
        elif head in ("visual_proj", "adapter"):
            parts[head].append((name, p))
        elif name in ("logit_scale", "logit_bias"):
            parts["logit_scale"].append((name, p))
        else:
            raise ValueError(f"parameter {name!r} belongs to no optimizer part; extend param_groups_for_llm2clip")
    lrs = {"tower": tower_lr, "visual_proj": head_lr, "adapter": adapter_lr,
           "logit_scale": head_lr if logit_scale_lr is None else logit_scale_lr}

    def layer_id(part: str, name: str) -> int | None:
        return tower.layer_id(name) if part == "tower" else None

    return build_param_groups(parts, lrs, weight_decay, layer_decay, layer_id, num_layers=tower.num_layers)
