"""Contrastive losses for stage 2 (distributed local-loss form)."""
from llm2clip.losses.clip import ClipLoss, SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
