"""Use a trained LLM2CLIP model from Python.

    import llm2clip
    m = llm2clip.load_model("runs/stage2/export/model")            # stage-2 export folder
    img = m.encode_image(torch.stack([m.preprocess(pil) for pil in images]))
    txt = m.encode_text(["a red circle on the left"])              # runs the stage-1 encoder + adapter
    sims = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(txt, dim=-1).T

The text side finds the stage-1 encoder from what stage 2 recorded (`text_encoder` in
llm2clip_config.json); pass `text_model_path=` when the encoder has moved.
"""
from __future__ import annotations

from typing import Any

import torch

from llm2clip.data.transforms import eval_transform
from llm2clip.model.clip_model import LLM2CLIPModel


class LLM2CLIP:
    """A stage-2 model with its text encoder, built lazily on the first `encode_text`."""

    def __init__(self, model: LLM2CLIPModel, text_overrides: dict[str, Any], device: torch.device):
        self.model, self.device = model.to(device).eval().requires_grad_(False), device
        t = model.tower
        self.preprocess = eval_transform(t.image_size, t.mean, t.std)  # PIL image -> [3, H, W]
        self._text_overrides = text_overrides
        self._encoder = None

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] (from `preprocess`) -> [B, embed_dim] image features (not normalised)."""
        return self.model.encode_image(pixels.to(self.device)).float()

    @torch.no_grad()
    def encode_text_embedding(self, llm_emb: torch.Tensor) -> torch.Tensor:
        """[B, llm_dim] precomputed LLM embeddings (e.g. from sidecars) -> [B, embed_dim] text features."""
        return self.model.encode_text_embedding(llm_emb.to(self.device)).float()

    @torch.no_grad()
    def encode_text(self, captions: list[str], instruction: str | None = None, batch_size: int = 64) -> torch.Tensor:
        """Captions -> [N, embed_dim] text features, through the stage-1 encoder and the adapter."""
        instr = str(self.model.text_encoder_info.get("instruction", "")) if instruction is None else instruction
        embedder = self._text_embedder()
        embedder.max_batch_size = batch_size
        return self.encode_text_embedding(embedder.embed(list(captions), instr))

    def _text_embedder(self):
        """The TextEmbedder of the recorded stage-1 encoder (the same batching, pooling and dtype policy
        as the embed step: bf16 on GPU, fp32 on CPU)."""
        if self._encoder is None:
            from llm2clip.text.embedder import TextEmbedder
            from llm2clip.text.settings import recorded_settings, text_encoder_config

            cfg = text_encoder_config(recorded_settings(self.model.text_encoder_info or {}), self._text_overrides,
                                      "load_model")
            if not cfg.model_path:
                raise ValueError("this model records no text encoder path; pass load_model(..., text_model_path=...)")
            embedder = TextEmbedder(cfg, self.device)
            if embedder.hidden_size != self.model.llm_dim:
                raise ValueError(f"the text encoder at {cfg.model_path} is {embedder.hidden_size} wide but the adapter "
                                 f"expects {self.model.llm_dim}: use the stage-1 encoder this model was trained with")
            self._encoder = embedder
        return self._encoder


def load_model(path: str, text_model_path: str | None = None, device: str | torch.device = "cpu",
               check_fingerprint: bool = True, **text_overrides: Any) -> LLM2CLIP:
    """Load a stage-2 export (`<run>/export/model`). Extra keyword arguments override text-encoder
    settings (any TextEncoderConfig field, e.g. `lora_path=`, `max_length=`).

    text_model_path: where the stage-1 encoder is now (models move between machines); default: the
      location stage 2 recorded. Its content fingerprint (weights, tokenizer, settings; no paths) must
      equal the recorded one, else a ValueError names both (check_fingerprint=False skips the check).
    """
    if text_model_path:
        text_overrides["model_path"] = text_model_path
    model = LLM2CLIPModel.from_pretrained(path)
    if text_model_path and check_fingerprint:
        check_text_encoder(model.text_encoder_info or {}, text_overrides)
    return LLM2CLIP(model, text_overrides, torch.device(device))


def check_text_encoder(info: dict[str, Any], overrides: dict[str, Any]) -> None:
    """The encoder `overrides` point at is the one the adapter was trained on: same content fingerprint
    as stage 2 recorded (the embed step's: weights, tokenizer, pooling, template, instruction...)."""
    from llm2clip.text.feature_cache import encoder_fingerprint
    from llm2clip.text.settings import recorded_settings, text_encoder_config

    want = info.get("fingerprint")
    if not want:
        return  # older exports record no fingerprint: nothing to compare
    cfg = text_encoder_config(recorded_settings(info), overrides, "load_model")
    got = encoder_fingerprint(cfg, str(info.get("instruction", "")))
    if got != want:
        raise ValueError(f"the text encoder at {cfg.model_path} (fingerprint {got[:12]}) is not the one this model's "
                         f"adapter was trained on (recorded {want[:12]}, at {info.get('model_path') or '?'}): point "
                         "text_model_path at a copy of that stage-1 export, or pass check_fingerprint=False")
