"""The model side of the memory plan: exact parameter counts and traced activation bytes, from a model's
config.json alone. The model is built on the meta device (no weights, no memory); LoRA is applied by peft
as stage 1 does; activations are the tensors autograd keeps for backward in a meta forward, seen through
`torch.autograd.graph.saved_tensors_hooks` (deduplicated by storage, parameters left out).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from llm2clip.text.encoder import ENCODER_ONLY


class PlanError(ValueError):
    pass


# ---- the model on the meta device --------------------------------------------------------------------
def read_model_config(model_path: str, key: str = "text.model_path"):
    """transformers config of a local model folder; a one-line error naming the key when it has none."""
    from transformers import AutoConfig

    p = Path(model_path)
    if not (p / "config.json").is_file():
        raise PlanError(f"{key}: {p} has no config.json; point {key} at a HuggingFace model folder "
                        "(the plan reads only its config.json, no weights)")
    return AutoConfig.from_pretrained(str(p), local_files_only=True)


def meta_model(hf_cfg, lora=None, attn: str = "sdpa", layers: int | None = None):
    """The backbone (AutoModel, no LM head) on the meta device, LoRA applied as stage 1 does."""
    from transformers import AutoModel

    cfg = type(hf_cfg).from_dict(hf_cfg.to_dict())
    if layers is not None:
        cfg.num_hidden_layers = layers
    if getattr(cfg, "model_type", "") not in ENCODER_ONLY:
        cfg.is_causal = False
    # planning must not move the training RNG (the engine plans after seeding; weight init draws from it)
    with torch.random.fork_rng(devices=[]):
        with torch.device("meta"):
            model = AutoModel.from_config(cfg, attn_implementation=attn)
        if lora is not None and lora.enabled:
            from peft import LoraConfig, get_peft_model

            from llm2clip.text.encoder import default_lora_targets

            targets = default_lora_targets(model, lora.target_modules)
            model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                     bias="none", target_modules=targets))
    return model


@dataclass
class ParamCounts:
    frozen: list[int]  # numel of each frozen tensor
    trainable: list[int]  # numel of each trainable tensor

    @property
    def n_frozen(self) -> int:
        return sum(self.frozen)

    @property
    def n_trainable(self) -> int:
        return sum(self.trainable)


def count_params(model) -> ParamCounts:
    fr, tr = [], []
    for p in model.parameters():
        (tr if p.requires_grad else fr).append(p.numel())
    return ParamCounts(fr, tr)


@dataclass
class Activations:
    per_token_layer: float  # bytes kept for backward per token per layer
    per_token_fixed: float  # embeddings, final norm, pooling: per token, once
    quad_layer: float  # bytes per (row x width^2) per layer: attention probabilities (eager / SDPA math)


def _saved_bytes(model, width: int, dtype: torch.dtype) -> int:
    """Bytes autograd keeps for backward in one forward of a packed [1, width] row (meta device): the
    block-diagonal float mask and explicit positions the stage-1 step passes, mean pooling in fp32."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.zeros(1, width, dtype=torch.long, device="meta")
    mask = torch.zeros(1, 1, width, width, dtype=dtype, device="meta")
    pos = torch.arange(width, device="meta")[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        hidden.float().mean(1)
    return sum(seen.values())


def trace_activations(hf_cfg, lora=None, dtype: torch.dtype = torch.bfloat16) -> Activations:
    """Per-token (per layer and fixed) and quadratic activation bytes from meta traces of 1 and 2 layers
    at widths 32 and 64 (eager attention, so the probabilities show up as the quadratic term)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # meta parameters (and so activations) in the compute dtype
    rng = torch.get_rng_state()  # the traces run in train mode (LoRA dropout): leave the training RNG as found
    try:
        s = {}
        for L in (1, 2):
            # DeepSpeed casts the whole module (LoRA included, which peft keeps in fp32) to bf16
            m = meta_model(hf_cfg, lora, attn="eager", layers=L).to(dtype)
            m.train()
            for W in (32, 64):
                s[L, W] = _saved_bytes(m, W, dtype)
    finally:
        torch.set_default_dtype(old)
        torch.set_rng_state(rng)
    # bytes(L, W) = L (a W + q W^2) + c W; solve from the four traces
    per_layer = {W: s[2, W] - s[1, W] for W in (32, 64)}
    fixed = {W: s[1, W] - per_layer[W] for W in (32, 64)}

    def split(v):  # v(W) = x W + y W^2 -> (x, y)
        y = (v[64] - 2 * v[32]) / (64 * 64 - 2 * 32 * 32)
        return (v[32] - y * 32 * 32) / 32, y

    a, q = split(per_layer)
    c, _ = split(fixed)
    return Activations(per_token_layer=a, per_token_fixed=c, quad_layer=q)
