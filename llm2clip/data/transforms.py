"""Image transforms with PIL + numpy only (no torchvision): train RandomResizedCrop, eval resize + centre crop.

    tf = train_transform(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    x = tf(pil_image, rng=sample_rng(seed, epoch, key))   # float32 tensor [3, 336, 336], normalised

No horizontal flip: captions say "left" and "right". Randomness comes from an explicit generator so a
resumed pipeline can reproduce crops: pass `rng` per call (e.g. `sample_rng(seed, epoch, key)`,
independent of worker count and order) or let the transform use its own `random.Random(seed)`.
Transforms are module-level classes, so they pickle into DataLoader workers; note that each worker
then holds a *copy* of the internal generator, so per-sample `rng` is the reproducible choice.
"""
from __future__ import annotations

import math
import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from llm2clip.data.rng import keyed_rng

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Rng = random.Random | np.random.Generator


sample_rng = keyed_rng  # the name this module's callers and tests use


def _uniform(rng: Rng, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _randint(rng: Rng, a: int, b: int) -> int:
    """Inclusive [a, b] for both generator types."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(a, b + 1))
    return rng.randint(a, b)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited onto white (not their hidden colour)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16/32-bit grey: rescale to 8 bit rather than clipping at 255.
        a = np.asarray(img, dtype=np.float64)
        hi = a.max() if a.size else 0.0
        a = a * (255.0 / hi) if hi > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def random_resized_crop_params(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
                               rng: Rng) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: -> (top, left, h, w).

    10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); then a centre crop clamped to
    the ratio range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(rng, scale[0], scale[1])
        aspect = math.exp(_uniform(rng, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return _randint(rng, 0, height - h), _randint(rng, 0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], (x / 255 - mean) / std."""
    a = np.asarray(img, dtype=np.float32) / 255.0  # [H, W, 3]
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class TrainTransform:
    """RandomResizedCrop(image_size, scale, ratio, bicubic) -> tensor -> normalise. No flip."""

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int | None = None):
        if not 0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.rng = random.Random(seed)

    def crop_box(self, width: int, height: int, rng: Rng | None = None) -> tuple[int, int, int, int]:
        """-> (left, top, right, bottom) of the crop for an image of this size."""
        top, left, h, w = random_resized_crop_params(width, height, self.scale, self.ratio, rng or self.rng)
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: Rng | None = None) -> torch.Tensor:
        """PIL image (any mode) -> float32 [3, image_size, image_size]."""
        img = to_rgb(img)
        box = self.crop_box(img.width, img.height, rng)
        s = self.image_size
        out = img.resize((s, s), Image.Resampling.BICUBIC, box=box)
        return to_normalized_tensor(out, self.mean, self.std)


class EvalTransform:
    """Resize the shortest side to image_size (bicubic) -> centre crop image_size² -> tensor -> normalise."""

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD):
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> float32 [3, image_size, image_size]."""
        img = to_rgb(img)
        s = self.image_size
        w, h = img.size
        # Same size rule as torchvision Resize(int): short side -> s, long side -> int(s * long / short).
        if w <= h:
            nw, nh = s, int(s * h / w)
        else:
            nw, nh = int(s * w / h), s
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        top, left = int(round((nh - s) / 2.0)), int(round((nw - s) / 2.0))
        img = img.crop((left, top, left + s, top + s))
        return to_normalized_tensor(img, self.mean, self.std)


def train_transform(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    seed: int | None = None) -> TrainTransform:
    """Stage-2 training transform (paper: RandomResizedCrop scale 0.9-1.0, bicubic, CLIP mean/std)."""
    return TrainTransform(image_size, mean, std, scale, ratio, seed)


def eval_transform(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                   std: Sequence[float] = OPENAI_CLIP_STD) -> EvalTransform:
    """Evaluation transform: resize shortest side + centre crop, deterministic."""
    return EvalTransform(image_size, mean, std)
