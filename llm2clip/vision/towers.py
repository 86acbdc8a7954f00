"""Vision tower registry: one `VisionTower` interface over HF CLIP, HF SigLIP/SigLIP2 and (optionally) timm.

    tower = build_vision_tower("auto", "/models/clip-vit-large-patch14-336", grad_checkpointing=True)
    feats = tower(pixels)            # pixels [B, 3, H, W] float, normalised with tower.mean/std -> [B, tower.out_dim]

Every tower exposes what stage 2 needs and nothing more: pooled features, its depth-ordered blocks
(for layer-wise lr decay), the stem modules, image size, normalisation constants and the logit
scale it was trained with. `tower.to_config()` is a JSON-able dict from which `VisionTower.from_config`
rebuilds the same architecture with random weights, so a saved LLM2CLIP model never needs the
original tower folder again.

Models always load from a local folder (`local_files_only=True`), never from a hub.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llm2clip.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Files of a timm / open_clip folder that may hold the whole CLIP checkpoint (with its learned logit
# scale) besides the vision weights; safetensors only, never unpickled.
_SCALE_FILES = ("open_clip_model.safetensors", "model.safetensors")

KINDS = ("hf_clip", "hf_siglip", "timm", "auto")
_CLIP_TYPES = ("clip", "clip_vision_model")
_SIGLIP_TYPES = ("siglip", "siglip_vision_model", "siglip2", "siglip2_vision_model")


class VisionTowerError(ValueError):
    """A vision tower folder or config problem; the message names the path or key."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VisionTowerError(f"{path} is not valid JSON: {e}") from None


def _read_folder_config(path: str | Path) -> tuple[Path, dict[str, Any]]:
    p = Path(path)
    if not p.is_dir():
        raise VisionTowerError(f"vision tower folder {str(p)!r} does not exist (model.vision.path); "
                               "point it at a local HF model folder containing config.json")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise VisionTowerError(f"vision tower folder {str(p)!r} has no config.json; expected a HF "
                               "CLIPModel / CLIPVisionModel / SiglipModel / SiglipVisionModel folder (or a timm folder)")
    return p, _read_json(cfg_file)


def _norm_from_preprocessor(folder: Path, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        d = _read_json(pp)
        if "image_mean" in d and "image_std" in d:
            return tuple(float(x) for x in d["image_mean"]), tuple(float(x) for x in d["image_std"])
    return tuple(default_mean), tuple(default_std)


def resolve_kind(kind: str, path: str | Path) -> str:
    """Map "auto" to a concrete backend from config.json's model_type (timm folders have "architecture")."""
    if kind not in KINDS:
        raise VisionTowerError(f"unknown vision tower kind {kind!r}; choose one of {list(KINDS)}")
    if kind != "auto":
        return kind
    folder, cfg = _read_folder_config(path)
    mt = cfg.get("model_type")
    if mt in _CLIP_TYPES:
        return "hf_clip"
    if mt in _SIGLIP_TYPES:
        return "hf_siglip"
    if "architecture" in cfg and mt is None:
        return "timm"
    raise VisionTowerError(f"{folder / 'config.json'}: cannot infer the vision tower kind from model_type={mt!r}; "
                           f"set model.vision.kind to one of {list(KINDS[:-1])}")


class VisionTower(nn.Module):
    """Image encoder returning pooled features.

    forward(pixels [B, 3, H, W]) -> [B, out_dim]. H = W = image_size unless the backend interpolates
    position embeddings (HF CLIP/SigLIP do when image_size differs from the pretrained size).

    Attributes: kind, out_dim, image_size, mean, std, logit_scale_init (log scale; None when the
    folder had none), logit_bias_init (SigLIP only, else None). Submodules: `model` (the backbone)
    and `proj` (the pretrained projection for CLIP, or None).
    """

    def __init__(self, kind: str, model: nn.Module, *, proj: nn.Linear | None, image_size: int,
                 mean, std, logit_scale_init: float | None, logit_bias_init: float | None,
                 hf_class: str = "", timm_arch: str = "", timm_kwargs: dict | None = None):
        super().__init__()
        self.kind = kind
        self.model = model
        self.proj = proj
        self.image_size = int(image_size)
        self.mean = tuple(float(x) for x in mean)
        self.std = tuple(float(x) for x in std)
        self.logit_scale_init = None if logit_scale_init is None else float(logit_scale_init)
        self.logit_bias_init = None if logit_bias_init is None else float(logit_bias_init)
        self.hf_class = hf_class
        self.timm_arch = timm_arch
        self.timm_kwargs = dict(timm_kwargs or {})
        cfg = getattr(model, "config", None)
        self._native_size = int(getattr(cfg, "image_size", 0) or 0) if cfg is not None else 0
        self._is_siglip2 = hf_class.startswith("Siglip2")
        if self._is_siglip2:
            self._patch = int(cfg.patch_size)
        if kind == "hf_siglip" and not getattr(model, "use_head", True):
            raise VisionTowerError(f"{hf_class} has vision_use_head=False: no MAP-pooled output to train on")
        if proj is not None:
            self.out_dim = proj.out_features
        elif kind == "timm":
            self.out_dim = int(model.num_features)
        else:
            self.out_dim = int(cfg.hidden_size)

    # ---- forward -------------------------------------------------------------------------------
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (normalised) -> pooled features [B, out_dim]."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"vision tower expects pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        if self.kind == "timm":
            return self.model(pixels)
        if self._is_siglip2:
            return self._forward_siglip2(pixels)
        interp = bool(self._native_size) and (pixels.shape[-1] != self._native_size or pixels.shape[-2] != self._native_size)
        out = self.model(pixel_values=pixels, interpolate_pos_encoding=interp).pooler_output
        return self.proj(out) if self.proj is not None else out

    def _forward_siglip2(self, pixels: torch.Tensor) -> torch.Tensor:
        # Fixed-resolution use of the NaFlex model: patchify exactly like Siglip2ImageProcessor
        # (patch vector ordered (p_h, p_w, C)), no padding patches.
        b, c, h, w = pixels.shape
        p = self._patch
        if h % p or w % p:
            raise ValueError(f"SigLIP2 needs H and W divisible by the patch size {p}, got {h}x{w}")
        gh, gw = h // p, w // p
        patches = pixels.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        mask = torch.ones(b, gh * gw, dtype=torch.long, device=pixels.device)
        shapes = torch.tensor([[gh, gw]] * b, dtype=torch.long, device=pixels.device)
        return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).pooler_output

    # ---- structure (layer-wise lr decay, freezing) ---------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in depth order (input side first)."""
        if self.kind == "timm":
            return list(self.model.blocks)
        return list(self.model.encoder.layers)

    @property
    def num_layers(self) -> int:
        return len(self.blocks())

    def embeddings_modules(self) -> list[nn.Module]:
        """Stem modules that run before block 0 (patch/position embeddings, pre-norm)."""
        m = self.model
        if self.kind == "timm":
            return [getattr(m, n) for n in ("patch_embed", "norm_pre") if isinstance(getattr(m, n, None), nn.Module)]
        mods = [m.embeddings]
        if hasattr(m, "pre_layrnorm"):
            mods.append(m.pre_layrnorm)
        return mods

    def layer_id(self, name: str) -> int:
        """Layer index of a parameter named relative to this tower (as in `tower.named_parameters()`).

        0 = stem (embeddings, class/position tokens, pre-norm), i + 1 = block i, num_layers + 1 =
        everything after the last block (post-norm, pooling head, projection).
        """
        if self.kind == "timm":
            m = re.match(r"model\.blocks\.(\d+)\.", name)
            if m:
                return int(m.group(1)) + 1
            stem = ("model.patch_embed", "model.cls_token", "model.pos_embed", "model.reg_token",
                    "model.dist_token", "model.norm_pre", "model.rope", "model.pos_drop")
            return 0 if name.startswith(stem) else self.num_layers + 1
        m = re.match(r"model\.encoder\.layers\.(\d+)\.", name)
        if m:
            return int(m.group(1)) + 1
        if name.startswith(("model.embeddings.", "model.pre_layrnorm.")):
            return 0
        return self.num_layers + 1

    def freeze(self, first_k: int | None = None) -> None:
        """Freeze the whole tower (first_k=None) or the stem + the first `first_k` blocks."""
        if first_k is None:
            for p in self.parameters():
                p.requires_grad_(False)
            return
        if first_k < 0 or first_k > self.num_layers:
            raise VisionTowerError(f"freeze_first_k={first_k} is outside [0, {self.num_layers}] for this tower")
        if first_k == 0:
            return
        for n, p in self.named_parameters():
            if self.layer_id(n) <= first_k:
                p.requires_grad_(False)

    def enable_grad_checkpointing(self) -> None:
        if self.kind == "timm":
            self.model.set_grad_checkpointing(True)
            return
        # Non-reentrant: works when the stem is frozen (inputs to the blocks need no grad).
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_config(self) -> dict[str, Any]:
        """JSON-able description from which `from_config` rebuilds this architecture (random weights)."""
        d: dict[str, Any] = {
            "kind": self.kind, "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
            "logit_scale_init": self.logit_scale_init, "logit_bias_init": self.logit_bias_init,
            "out_dim": self.out_dim,
            "proj": None if self.proj is None else {"in_dim": self.proj.in_features, "out_dim": self.proj.out_features,
                                                     "bias": self.proj.bias is not None},
        }
        if self.kind == "timm":
            d.update(timm_arch=self.timm_arch, timm_kwargs=self.timm_kwargs)
        else:
            d.update(hf_class=self.hf_class, hf_config=self.model.config.to_dict())
        return d

    @classmethod
    def from_config(cls, d: dict[str, Any]) -> "VisionTower":
        """Rebuild from `to_config()` output with randomly initialised weights (load a state dict next)."""
        kind = d.get("kind")
        if kind == "timm":
            timm = _import_timm()
            model = timm.create_model(d["timm_arch"], pretrained=False, **d.get("timm_kwargs", {}))
        elif kind in ("hf_clip", "hf_siglip"):
            model_cls, config_cls = _hf_vision_classes(d.get("hf_class", ""))
            cfg = config_cls.from_dict(dict(d["hf_config"]))
            model = model_cls(cfg)
        else:
            raise VisionTowerError(f"vision tower config has unknown kind {kind!r}")
        proj = None
        if d.get("proj"):
            pc = d["proj"]
            proj = nn.Linear(pc["in_dim"], pc["out_dim"], bias=pc.get("bias", False))
        t = cls(kind, model, proj=proj, image_size=d["image_size"], mean=d["mean"], std=d["std"],
                logit_scale_init=d.get("logit_scale_init"), logit_bias_init=d.get("logit_bias_init"),
                hf_class=d.get("hf_class", ""), timm_arch=d.get("timm_arch", ""), timm_kwargs=d.get("timm_kwargs"))
        return t


def _hf_vision_classes(hf_class: str):
    import transformers as tf
    table = {
        "CLIPVisionModel": ("CLIPVisionModel", "CLIPVisionConfig"),
        "SiglipVisionModel": ("SiglipVisionModel", "SiglipVisionConfig"),
        "Siglip2VisionModel": ("Siglip2VisionModel", "Siglip2VisionConfig"),
    }
    if hf_class not in table:
        raise VisionTowerError(f"unsupported HF vision class {hf_class!r}; known: {sorted(table)}")
    m, c = table[hf_class]
    return getattr(tf, m), getattr(tf, c)


def _import_timm():
    if importlib.util.find_spec("timm") is None:
        raise VisionTowerError("vision tower kind 'timm' needs the optional package timm, which is not installed "
                               "(timm pulls in torchvision, which breaks transformers on CPU-only setups); "
                               "use kind hf_clip / hf_siglip or install timm with a matching torchvision")
    import timm  # noqa: PLC0415  (optional dependency, imported lazily)
    return timm


def _load_hf_clip(folder: Path, cfg: dict[str, Any], use_pretrained_proj: bool, dtype: torch.dtype):
    import transformers as tf
    kw = dict(local_files_only=True, dtype=dtype)
    archs = cfg.get("architectures") or []
    scale = None
    proj = None
    if cfg.get("model_type") == "clip":
        full = tf.CLIPModel.from_pretrained(str(folder), **kw)
        vision, proj, scale = full.vision_model, full.visual_projection, float(full.logit_scale.detach())
        del full  # drop the text tower
    elif "CLIPVisionModelWithProjection" in archs:
        m = tf.CLIPVisionModelWithProjection.from_pretrained(str(folder), **kw)
        vision, proj = m.vision_model, m.visual_projection
    else:
        vision = tf.CLIPVisionModel.from_pretrained(str(folder), **kw)
    if not use_pretrained_proj:
        proj = None
    return vision, proj, scale, None


def _load_hf_siglip(folder: Path, cfg: dict[str, Any], dtype: torch.dtype):
    import transformers as tf
    kw = dict(local_files_only=True, dtype=dtype)
    mt = cfg.get("model_type")
    scale = bias = None
    if mt in ("siglip", "siglip2"):
        full_cls = tf.SiglipModel if mt == "siglip" else tf.Siglip2Model
        full = full_cls.from_pretrained(str(folder), **kw)
        vision = full.vision_model
        scale, bias = float(full.logit_scale.detach().reshape(-1)[0]), float(full.logit_bias.detach().reshape(-1)[0])
        del full
    elif mt == "siglip2_vision_model":
        vision = tf.Siglip2VisionModel.from_pretrained(str(folder), **kw)
    else:
        vision = tf.SiglipVisionModel.from_pretrained(str(folder), **kw)
    return vision, scale, bias


def build_vision_tower(kind: str, path: str | Path, image_size: int | None = None, grad_checkpointing: bool = False,
                       freeze: bool = False, freeze_first_k: int = 0, use_pretrained_proj: bool = True,
                       dtype: torch.dtype = torch.float32) -> VisionTower:
    """Load a pretrained vision tower from a local folder.

    kind: "hf_clip" | "hf_siglip" | "timm" | "auto" (from config.json's model_type).
    path: a HF CLIPModel / CLIPVisionModel(WithProjection) / SiglipModel / SiglipVisionModel /
      Siglip2(Vision)Model folder, or a timm folder (config.json with "architecture" + weights).
    image_size: input resolution; defaults to the pretrained one (CLIP/SigLIP interpolate position
      embeddings when it differs).
    use_pretrained_proj: CLIP only: append the folder's `visual_projection` (out_dim = projection_dim)
      when the folder has one; else out_dim = hidden size.
    freeze: freeze every tower parameter; freeze_first_k: freeze the stem and the first k blocks.
    dtype: parameter dtype to load in (fp32 master weights by default; mixed precision is the engine's job).
    """
    kind = resolve_kind(kind, path)
    folder, cfg = _read_folder_config(path)
    mt = cfg.get("model_type")
    if kind == "hf_clip":
        if mt not in _CLIP_TYPES:
            raise VisionTowerError(f"{folder / 'config.json'}: model_type {mt!r} is not a CLIP model; use kind auto or hf_siglip")
        vision, proj, scale, bias = _load_hf_clip(folder, cfg, use_pretrained_proj, dtype)
        mean, std = _norm_from_preprocessor(folder, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        size = image_size or int(vision.config.image_size)
        tower = VisionTower("hf_clip", vision, proj=proj, image_size=size, mean=mean, std=std,
                            logit_scale_init=scale, logit_bias_init=bias, hf_class="CLIPVisionModel")
    elif kind == "hf_siglip":
        if mt not in _SIGLIP_TYPES:
            raise VisionTowerError(f"{folder / 'config.json'}: model_type {mt!r} is not a SigLIP model; use kind auto or hf_clip")
        vision, scale, bias = _load_hf_siglip(folder, cfg, dtype)
        mean, std = _norm_from_preprocessor(folder, SIGLIP_MEAN, SIGLIP_STD)
        vc = vision.config
        native = getattr(vc, "image_size", None) or int(math.isqrt(int(vc.num_patches))) * int(vc.patch_size)
        tower = VisionTower("hf_siglip", vision, proj=None, image_size=image_size or int(native), mean=mean, std=std,
                            logit_scale_init=scale, logit_bias_init=bias, hf_class=type(vision).__name__)
    else:  # timm
        tower = _load_timm(folder, cfg, image_size, dtype)
    if freeze:
        tower.freeze()
    elif freeze_first_k:
        tower.freeze(freeze_first_k)
    if grad_checkpointing:
        tower.enable_grad_checkpointing()
    return tower


def _load_timm(folder: Path, cfg: dict[str, Any], image_size: int | None, dtype: torch.dtype) -> VisionTower:
    timm = _import_timm()
    arch = cfg.get("architecture")
    if not arch:
        raise VisionTowerError(f"{folder / 'config.json'} has no 'architecture' key: not a timm folder")
    weights = next((folder / n for n in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin")
                    if (folder / n).is_file()), None)
    if weights is None:
        raise VisionTowerError(f"timm folder {str(folder)!r} has no model.safetensors / pytorch_model.bin")
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **kwargs)
    model.to(dtype)
    pc = dict(cfg.get("pretrained_cfg") or {})
    pc.update(getattr(model, "pretrained_cfg", {}) or {})
    size = image_size or int((pc.get("input_size") or (3, 224, 224))[-1])
    return VisionTower("timm", model, proj=None, image_size=size, mean=pc.get("mean", OPENAI_CLIP_MEAN),
                       std=pc.get("std", OPENAI_CLIP_STD), logit_scale_init=checkpoint_logit_scale(folder),
                       logit_bias_init=None, timm_arch=arch, timm_kwargs=kwargs)


def checkpoint_logit_scale(folder: str | Path) -> float | None:
    """The learned log logit scale a timm / open_clip tower folder carries, or None.

    EVA02-CLIP folders on the hub hold the whole open_clip checkpoint (`open_clip_model.safetensors`,
    top-level tensor `logit_scale`, a log scale, ~ln 100 after pretraining) next to the timm vision
    weights; some single-file exports keep `logit_scale` in `model.safetensors`. Only the header and
    that one tensor are read.
    """
    from safetensors import safe_open

    for name in _SCALE_FILES:
        f = Path(folder) / name
        if not f.is_file():
            continue
        with safe_open(str(f), framework="pt") as st:
            if "logit_scale" in st.keys():
                return float(st.get_tensor("logit_scale").float().reshape(-1)[0])
    return None
