"""Vision towers (HF CLIP, HF SigLIP/SigLIP2, optional timm) behind one interface."""
from llm2clip.vision.towers import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, VisionTower, VisionTowerError,
                                    build_vision_tower, resolve_kind)

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "VisionTower", "VisionTowerError", "build_vision_tower",
           "resolve_kind"]
