"""Image transforms with PIL + numpy only (no torchvision): train RandomResizedCrop, eval resize + centre crop.

    tf = train_transform(336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    x = tf(pil_image, rng=sample_rng(seed, epoch, key))   # float32 tensor [3, 336, 336], normalised
    tf = train_transform(336, normalize=False)             # uint8 [3, 336, 336]: what loader workers ship
    x = normalize(pixels.to(device), tf.mean, tf.std, torch.bfloat16)   # ... normalised after the transfer

The stage-2 loader workers ship uint8 (4x fewer host bytes than float32 through shared memory and
pinned buffers, and over PCIe); `normalize` is the one place pixels become (x / 255 - mean) / std, on
the device after transfer, in float32 and then cast to the model's dtype. The public preprocess
(`llm2clip.load_model(...).preprocess`) and the eval tool keep normalised float tensors, through it.

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


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W] (0..255)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)))


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels [..., 3, H, W] -> `dtype`, (x / 255 - mean) / std, computed in float32 on the pixels'
    device (call it after the transfer). A float input is refused: it is normalised already (or not
    pixels), and normalising twice would train silently on wrong inputs."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels [..., 3, H, W], got {pixels.dtype}")
    m = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return ((pixels.to(torch.float32) / 255.0 - m) / s).to(dtype)


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL image -> float32 tensor [3, H, W], (x / 255 - mean) / std."""
    return normalize(to_uint8_tensor(img), mean, std)


def _output(img: Image.Image, t: "TrainTransform | EvalTransform") -> torch.Tensor:
    return to_normalized_tensor(img, t.mean, t.std) if t.normalize else to_uint8_tensor(img)


class TrainTransform:
    """RandomResizedCrop(image_size, scale, ratio, bicubic) -> tensor -> normalise (normalize=False: the
    uint8 tensor, for `normalize` on the device). No flip."""

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), seed: int | None = None, normalize: bool = True):
        if not 0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.rng = random.Random(seed)
        self.normalize = normalize

    def crop_box(self, width: int, height: int, rng: Rng | None = None) -> tuple[int, int, int, int]:
        """-> (left, top, right, bottom) of the crop for an image of this size."""
        top, left, h, w = random_resized_crop_params(width, height, self.scale, self.ratio, rng or self.rng)
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: Rng | None = None) -> torch.Tensor:
        """PIL image (any mode) -> float32 [3, image_size, image_size] (uint8 with normalize=False)."""
        img = to_rgb(img)
        box = self.crop_box(img.width, img.height, rng)
        s = self.image_size
        return _output(img.resize((s, s), Image.Resampling.BICUBIC, box=box), self)


class EvalTransform:
    """Resize the shortest side to image_size (bicubic) -> centre crop image_size² -> tensor -> normalise
    (normalize=False: the uint8 tensor)."""

    def __init__(self, image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD, normalize: bool = True):
        self.image_size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.normalize = normalize

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> float32 [3, image_size, image_size] (uint8 with normalize=False)."""
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
        return _output(img.crop((left, top, left + s, top + s)), self)


def train_transform(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN, std: Sequence[float] = OPENAI_CLIP_STD,
                    scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                    seed: int | None = None, normalize: bool = True) -> TrainTransform:
    """Stage-2 training transform (paper: RandomResizedCrop scale 0.9-1.0, bicubic, CLIP mean/std)."""
    return TrainTransform(image_size, mean, std, scale, ratio, seed, normalize)


def eval_transform(image_size: int, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                   std: Sequence[float] = OPENAI_CLIP_STD, normalize: bool = True) -> EvalTransform:
    """Evaluation transform: resize shortest side + centre crop, deterministic."""
    return EvalTransform(image_size, mean, std, normalize)
