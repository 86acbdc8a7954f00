"""A plain Hugging Face CLIP checkpoint behind the ``ImageTextModel`` protocol.

Baseline for the evaluation tool: any folder written by ``CLIPModel.save_pretrained`` plus
its tokenizer and ``preprocessor_config.json`` (e.g. a downloaded openai/clip-vit-large-patch14).
Nothing is downloaded: the folder must exist locally.

Preprocessing reads its settings (sizes, mean/std, resampling) from the folder's
``preprocessor_config.json`` and applies them with the semantics of OpenAI CLIP / open_clip's
torchvision eval transform on PIL images -- the transform behind published CLIP numbers:
resize the shortest side (long side ``int(size * long / short)``, PIL bicubic), centre crop
with offsets ``round((H - h) / 2)``, ``/ 255``, normalise. transformers' own
``CLIPImageProcessorPil`` floors the crop offset instead, which shifts the crop by one pixel
whenever the leftover is 3 mod 4 (e.g. 67 -> 32: top 17 vs 18). No torchvision involved.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


class HFCLIPModel:
    """``CLIPModel`` + tokenizer + PIL image processor from one local folder.

    Attributes:
        name: folder basename (used in result tables).
        model, tokenizer, processor: the loaded transformers objects.
        device, dtype: where and in what precision the towers run.
        max_length: text truncation length (the text tower's position count, 77 for CLIP).
    """

    def __init__(self, model, tokenizer, processor, name: str, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.name = name
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        limits = [model.config.text_config.max_position_embeddings]
        tok_max = getattr(tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:
            limits.append(tok_max)
        self.max_length = min(limits)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> "HFCLIPModel":
        """Load from a local folder. ``dtype`` (e.g. ``torch.bfloat16``) defaults to float32.

        Raises ``FileNotFoundError`` naming ``path`` if the folder or one of its parts is missing.
        """
        from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP model folder not found: {path}")
        for needed in ("config.json", "preprocessor_config.json"):
            if not os.path.isfile(os.path.join(path, needed)):
                raise FileNotFoundError(f"{path} has no {needed}; expected a folder written by save_pretrained "
                                        "with the model, its tokenizer and its image processor")
        model = CLIPModel.from_pretrained(path, dtype=dtype or torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        processor = CLIPImageProcessorPil.from_pretrained(path, local_files_only=True)
        model.to(device)
        return cls(model, tokenizer, processor, os.path.basename(os.path.normpath(path)), device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> ``[3, H, W]`` float32 normalised pixels (H, W = the processor's crop size)."""
        return clip_eval_transform(image, self.processor)

    @torch.no_grad()  # not inference_mode: callers may normalise the result in place
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` pixels -> ``[B, D]`` float32 projected image features (not normalised)."""
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _pooled(out).float()

    @torch.no_grad()  # not inference_mode: callers may normalise the result in place
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ``[B, D]`` float32 projected text features (not normalised).
        Texts longer than ``max_length`` tokens are truncated, as CLIP does."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                           attention_mask=batch["attention_mask"].to(self.device))
        return _pooled(out).float()


def clip_eval_transform(image: Image.Image, processor) -> torch.Tensor:
    """OpenAI CLIP's eval transform (torchvision semantics on PIL) with ``processor``'s settings.

    ``processor``: any object with CLIPImageProcessor attributes (``size``, ``crop_size``,
    ``resample``, ``do_*``, ``rescale_factor``, ``image_mean``, ``image_std``).
    Returns ``[3, H, W]`` float32.
    """
    p = processor
    img = image.convert("RGB")
    if p.do_resize:
        short = getattr(p.size, "shortest_edge", None)
        w, h = img.size
        if short:
            if w <= h:
                new = (short, int(short * h / w))
            else:
                new = (int(short * w / h), short)
        else:
            new = (p.size.width, p.size.height)
        if new != (w, h):
            img = img.resize(new, resample=int(p.resample))
    if p.do_center_crop:
        w, h = img.size
        cw, ch = p.crop_size.width, p.crop_size.height
        if cw > w or ch > h:  # torchvision pads with zeros; CLIP inputs never need it after the resize
            raise ValueError(f"crop {cw}x{ch} larger than the resized image {w}x{h}")
        left, top = int(round((w - cw) / 2.0)), int(round((h - ch) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    arr = np.asarray(img, dtype=np.float32)
    if p.do_rescale:  # divide like torchvision's ToTensor when the factor is 1/255
        factor = float(p.rescale_factor)
        arr = arr / np.float32(255.0) if abs(factor * 255.0 - 1.0) < 1e-9 else arr * np.float32(factor)
    if p.do_normalize:
        arr = (arr - np.asarray(p.image_mean, dtype=np.float32)) / np.asarray(p.image_std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features;
    # older releases returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output
