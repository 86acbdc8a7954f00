"""Hugging Face export of a trained LLM2CLIP vision tower: the folder LLaVA-style models consume.

    python tools/export_hf_vision.py runs/stage2/export/model            # -> runs/stage2/export/hf_vision
    export_hf_vision("runs/stage2/export/model", "runs/stage2/export/hf_vision")

What is written (plain transformers folders; loading them never needs llm2clip):
  - CLIP towers: `CLIPVisionModelWithProjection` (config.json + model.safetensors +
    preprocessor_config.json). `image_embeds` = our `encode_image` (the new 1280-wide projection; a kept
    pretrained projection is folded into it). `AutoModel.from_pretrained` gives the `CLIPVisionModel`
    under it (what LLaVA's vision tower loads: hidden states, no projection); the projection weight is
    then reported as unused, which is expected.
  - SigLIP towers: transformers 5.x has no SigLIP vision class with a projection, so the folder is a
    `SiglipVisionModel` (its MAP-pooled `pooler_output`, width = hidden size) plus
    `visual_projection.safetensors` holding one tensor `weight` [embed_dim, hidden_size] (no bias):
    image embedding = pooler_output @ weight.T.
  - timm towers (EVA02) have no transformers class: not exported (an error says so).
Image size is the training resolution; the model is saved in float32.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from llm2clip.config import atomic_dir
from llm2clip.model.clip_model import LLM2CLIPModel

PROJECTION_FILE = "visual_projection.safetensors"


class HFExportError(ValueError):
    """This tower cannot be written as a transformers folder; the message says why."""


def _projection(model: LLM2CLIPModel) -> torch.Tensor:
    """[embed_dim, backbone width]: visual_proj, with a kept pretrained projection folded in (both bias-free)."""
    w = model.visual_proj.weight.detach().double()
    proj = model.tower.proj
    if proj is not None:
        if proj.bias is not None:
            raise HFExportError("the tower's pretrained projection has a bias; CLIPVisionModelWithProjection has none")
        w = w @ proj.weight.detach().double()
    return w.float().contiguous()


def _check_size(model: LLM2CLIPModel) -> int:
    t = model.tower
    native = int(getattr(t.model.config, "image_size", 0) or 0)
    if native and native != t.image_size:
        # HF interpolates position embeddings only when asked per call; LLaVA never asks.
        raise HFExportError(f"the tower was trained at {t.image_size}px but its position embeddings are for "
                            f"{native}px; a transformers folder cannot record that interpolation")
    return t.image_size


def _write_clip(model: LLM2CLIPModel, tmp: Path) -> None:
    import transformers as tf

    size = _check_size(model)
    cfg = tf.CLIPVisionConfig.from_dict({**model.tower.model.config.to_dict(), "projection_dim": model.embed_dim})
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    hf = tf.CLIPVisionModelWithProjection(cfg).eval()
    hf.vision_model.load_state_dict({k: v.float() for k, v in model.tower.model.state_dict().items()}, strict=True)
    with torch.no_grad():
        hf.visual_projection.weight.copy_(_projection(model))
    hf.save_pretrained(str(tmp))
    tf.CLIPImageProcessor(do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
                          crop_size={"height": size, "width": size}, image_mean=list(model.tower.mean),
                          image_std=list(model.tower.std)).save_pretrained(str(tmp))


def _write_siglip(model: LLM2CLIPModel, tmp: Path) -> None:
    import transformers as tf
    from safetensors.torch import save_file

    if model.tower.hf_class != "SiglipVisionModel":
        raise HFExportError(f"{model.tower.hf_class} export is not supported (NaFlex SigLIP2 needs its own "
                            "processor); only SiglipVisionModel towers")
    size = _check_size(model)
    hf = tf.SiglipVisionModel(tf.SiglipVisionConfig.from_dict(model.tower.model.config.to_dict())).eval()
    hf.load_state_dict({k: v.float() for k, v in model.tower.model.state_dict().items()}, strict=True)
    hf.config.architectures = ["SiglipVisionModel"]
    hf.save_pretrained(str(tmp))
    save_file({"weight": _projection(model)}, str(tmp / PROJECTION_FILE), metadata={"format": "pt"})
    tf.SiglipImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3,
                            image_mean=list(model.tower.mean), image_std=list(model.tower.std)).save_pretrained(str(tmp))


def export_hf_vision(model: LLM2CLIPModel | str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the vision side of a stage-2 model (an `LLM2CLIPModel` or its `export/model` folder) as a
    transformers folder at `out_dir` (replaced atomically). Returns `out_dir`."""
    if not isinstance(model, LLM2CLIPModel):
        model = LLM2CLIPModel.from_pretrained(model)
    kind = model.tower.kind
    if kind not in ("hf_clip", "hf_siglip"):
        raise HFExportError(f"vision tower kind {kind!r} has no transformers class; the Hugging Face export "
                            "covers hf_clip and hf_siglip towers (use llm2clip.load_model for this one)")
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        (_write_clip if kind == "hf_clip" else _write_siglip)(model, tmp)
        (tmp / "llm2clip_export.json").write_text(json.dumps({
            "source": "llm2clip stage-2 vision tower", "kind": kind, "embed_dim": model.embed_dim,
            "image_size": model.tower.image_size, "text_encoder": model.text_encoder_info,
            "image_embeds": ("CLIPVisionModelWithProjection(...).image_embeds" if kind == "hf_clip" else
                             f"SiglipVisionModel(...).pooler_output @ {PROJECTION_FILE}['weight'].T")}, indent=1))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a stage-2 export folder (<run>/export/model)")
    ap.add_argument("--out", default=None, help="default: hf_vision next to the model folder")
    args = ap.parse_args(argv)
    out = args.out or str(Path(args.model).resolve().parent / "hf_vision")
    print(export_hf_vision(args.model, out))


if __name__ == "__main__":
    main()
