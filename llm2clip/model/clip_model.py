"""LLM2CLIP stage-2 model: vision tower -> fresh projection; LLM embedding -> adapter; learned logit scale.

    model = LLM2CLIPModel(build_vision_tower("auto", tower_dir), llm_dim=4096)
    img, txt, scale = model(pixels, llm_emb)[:3]    # normalised [B, E], [B, E]; scale = exp(logit_scale)
    loss = ClipLoss()(*model(pixels, llm_emb))

`save_pretrained(dir)` writes `model.safetensors` + `llm2clip_config.json` (the tower's architecture
config is embedded, so `from_pretrained(dir)` needs neither the tower folder nor pickle).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llm2clip.config import atomic_dir
from llm2clip.model.adapter import LLMAdapter
from llm2clip.vision.towers import VisionTower

CONFIG_NAME = "llm2clip_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MAX_LOGIT_SCALE = math.log(100.0)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)


def initial_logit_scale(checkpoint: float | None, configured: float | None, logit_bias: bool = False) -> float:
    """The log logit scale stage 2 starts from.

    The paper keeps the pretrained CLIP's learned scale, so the source checkpoint's value wins
    (`checkpoint`: the tower folder's, None when it has none). Else `configured` (model.logit_scale_init),
    else ln 100 for the CLIP loss (where every pretrained CLIP ends: at lr 1e-5 a scale started at
    ln(1/0.07) moves ~0.15 in 15k steps and would stay near 16) or ln 10 for SigLIP (its paper's init).
    """
    if checkpoint is not None:
        return float(checkpoint)
    if configured is not None:
        return float(configured)
    return SIGLIP_LOGIT_SCALE_INIT if logit_bias else MAX_LOGIT_SCALE


class LLM2CLIPModel(nn.Module):
    """Vision tower + visual_proj (no bias) on the image side, LLMAdapter on the text side.

    Args:
      tower: a VisionTower (pretrained or rebuilt from config).
      llm_dim: width of the LLM caption embeddings the adapter consumes.
      embed_dim: joint embedding width (paper: 1280).
      adapter_blocks / adapter_expansion / adapter_dropout: see LLMAdapter.
      logit_bias: add a learnable bias (needed by SigLipLoss).
      logit_scale_init: log-scale init used when the tower's checkpoint has no learned scale; see
        `initial_logit_scale` (the checkpoint's scale always wins, as in the paper).
      logit_bias_init: default the tower's, else -10 (SigLIP paper).
      text_encoder_info: free-form JSON-able dict describing the LLM that produced the embeddings
        (path, fingerprint, pooling...); stored in the saved config, used in error messages.
    """

    def __init__(self, tower: VisionTower, llm_dim: int, embed_dim: int = 1280, adapter_blocks: int = 4,
                 adapter_expansion: int = 2, adapter_dropout: float = 0.0, logit_bias: bool = False,
                 logit_scale_init: float | None = None, logit_bias_init: float | None = None,
                 text_encoder_info: dict[str, Any] | None = None):
        super().__init__()
        self.tower = tower
        self.embed_dim = embed_dim
        self.llm_dim = llm_dim
        self.text_encoder_info = dict(text_encoder_info or {})
        self.visual_proj = nn.Linear(tower.out_dim, embed_dim, bias=False)
        nn.init.normal_(self.visual_proj.weight, std=tower.out_dim ** -0.5)
        source = (self.text_encoder_info.get("model_path") or self.text_encoder_info.get("path")
                  or "the stage-1 text encoder")
        self.adapter = LLMAdapter(llm_dim, embed_dim, adapter_blocks, adapter_expansion, adapter_dropout,
                                  source=str(source))
        self._adapter_cfg = {"num_blocks": adapter_blocks, "expansion": adapter_expansion, "dropout": adapter_dropout}
        init = initial_logit_scale(tower.logit_scale_init, logit_scale_init, logit_bias)
        # shape [1], not a scalar: DeepSpeed cannot broadcast 0-dim parameters
        self.logit_scale = nn.Parameter(torch.tensor([init]))
        if logit_bias:
            b = logit_bias_init if logit_bias_init is not None else tower.logit_bias_init
            self.logit_bias: nn.Parameter | None = nn.Parameter(torch.tensor([float(-10.0 if b is None else b)]))
        else:
            self.logit_bias = None

    # ---- encoders ---------------------------------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] -> image features [B, embed_dim] (not normalised)."""
        return self.visual_proj(self.tower(pixels))

    def encode_text_embedding(self, llm_emb: torch.Tensor) -> torch.Tensor:
        """LLM caption embeddings [B, llm_dim] -> text features [B, embed_dim] (not normalised)."""
        return self.adapter(llm_emb)

    def forward(self, pixels: torch.Tensor, llm_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (image [B, E] L2-normalised, text [B, E] L2-normalised, exp(logit_scale) scalar[, logit_bias]).

        The 4th element is present only when the model has a logit bias (SigLIP), so
        `loss_fn(*model(pixels, emb))` works for ClipLoss and SigLipLoss alike. The scale is
        clamped to [1, 100] here as well as by `clamp_logit_scale()`: under mixed-precision
        engines that keep fp32 master weights, clamping the module parameter alone does not stick.
        """
        img = F.normalize(self.encode_image(pixels), dim=-1)
        txt = F.normalize(self.encode_text_embedding(llm_emb), dim=-1)
        scale = self.logit_scale.clamp(0, MAX_LOGIT_SCALE).exp()
        if self.logit_bias is not None:
            return img, txt, scale, self.logit_bias
        return img, txt, scale

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clamp logit_scale to [0, ln 100] in place; call after each optimizer step."""
        self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # ---- save / load ------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "architecture": "LLM2CLIPModel",
            "embed_dim": self.embed_dim,
            "llm_dim": self.llm_dim,
            "adapter": dict(self._adapter_cfg),
            "logit_bias": self.logit_bias is not None,
            "text_encoder": self.text_encoder_info,
            "image_size": self.tower.image_size,
            "mean": list(self.tower.mean),
            "std": list(self.tower.std),
            "vision_tower": self.tower.to_config(),
        }

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write model.safetensors + llm2clip_config.json into `out_dir`, atomically.

        Files go to a temporary sibling folder first, which is renamed onto `out_dir`; an existing
        `out_dir` is replaced only after the new one is complete. Pass `state_dict` when the engine
        holds the full weights elsewhere (e.g. gathered from ZeRO partitions). Call on one rank.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        sd = self.state_dict() if state_dict is None else state_dict
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in sd.items():
            t = v.detach().to("cpu")
            ptr = t.untyped_storage().data_ptr()
            # safetensors refuses tensors that share storage or are views into a larger buffer.
            if ptr in seen or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes:
                t = t.contiguous().clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[k] = t
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            with open(tmp / CONFIG_NAME, "w", encoding="utf-8") as f:
                json.dump(self.config_dict(), f, indent=2, sort_keys=True)
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "LLM2CLIPModel":
        """Build the architecture described by `config_dict()` with random weights."""
        tower = VisionTower.from_config(cfg["vision_tower"])
        a = cfg.get("adapter", {})
        return cls(tower, llm_dim=int(cfg["llm_dim"]), embed_dim=int(cfg["embed_dim"]),
                   adapter_blocks=int(a.get("num_blocks", 4)), adapter_expansion=int(a.get("expansion", 2)),
                   adapter_dropout=float(a.get("dropout", 0.0)), logit_bias=bool(cfg.get("logit_bias", False)),
                   text_encoder_info=cfg.get("text_encoder") or {})

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> "LLM2CLIPModel":
        """Rebuild from a `save_pretrained` folder (safetensors only, never unpickles); returns it on `map_location`."""
        from safetensors.torch import load_file

        d = Path(model_dir)
        if not d.is_dir():
            raise FileNotFoundError(f"LLM2CLIP model folder {str(d)!r} does not exist")
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"LLM2CLIP model folder {str(d)!r} is incomplete: missing {', '.join(missing)} "
                                    "(was it written by LLM2CLIPModel.save_pretrained?)")
        with open(d / CONFIG_NAME, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{d / CONFIG_NAME}: format_version {cfg.get('format_version')} is newer than this "
                             f"code understands ({FORMAT_VERSION}); upgrade llm2clip")
        model = cls.from_config(cfg)
        sd = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        result = model.load_state_dict(sd, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{d / WEIGHTS_NAME} does not match {d / CONFIG_NAME}: "
                             f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
        return model
