"""Evaluation: dataset readers, metrics, prompt templates, and the model protocol.

Any model evaluated by ``tools/eval_zero_shot.py`` implements ``ImageTextModel``:
``HFCLIPModel`` (a plain Hugging Face CLIP folder) and the stage-2 LLM2CLIP model alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from PIL import Image


@runtime_checkable
class ImageTextModel(Protocol):
    """What evaluation needs from a model.

    - ``name``: label used in result tables.
    - ``preprocess(pil_image)``: RGB PIL image -> ``[3, H, W]`` float tensor (eval transform:
      resize + centre crop + normalise).
    - ``encode_image(pixels)``: ``[B, 3, H, W]`` -> ``[B, D]`` features.
    - ``encode_text(texts)``: list of B strings -> ``[B, D]`` features in the same space.

    Features are returned un-normalised; callers L2-normalise before cosine similarity.
    """

    name: str

    def preprocess(self, pil_image: Image.Image) -> torch.Tensor: ...

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: list[str]) -> torch.Tensor: ...


__all__ = ["ImageTextModel"]
