"""A plain Hugging Face CLIP checkpoint behind the ``ImageTextModel`` protocol.

Baseline for the evaluation tool: any folder written by ``CLIPModel.save_pretrained`` plus
its tokenizer and ``preprocessor_config.json`` (e.g. a downloaded openai/clip-vit-large-patch14).
Nothing is downloaded: the folder must exist locally.

Preprocessing uses transformers' PIL backend (``CLIPImageProcessorPil``: resize shortest side,
bicubic, centre crop, rescale, normalise), never torchvision, so results do not depend on
whether torchvision is installed.
"""

from __future__ import annotations

import os

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
        out = self.processor(images=image.convert("RGB"), return_tensors="pt")
        return out["pixel_values"][0].float()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` pixels -> ``[B, D]`` float32 projected image features (not normalised)."""
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return _pooled(out).float()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Captions -> ``[B, D]`` float32 projected text features (not normalised).
        Texts longer than ``max_length`` tokens are truncated, as CLIP does."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device),
                                           attention_mask=batch["attention_mask"].to(self.device))
        return _pooled(out).float()


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features;
    # older releases returned the tensor itself.
    return out if isinstance(out, torch.Tensor) else out.pooler_output
