"""Stage-2 model: vision tower + fresh projection, LLM-embedding adapter, logit scale."""
from llm2clip.model.adapter import LLMAdapter
from llm2clip.model.clip_model import LLM2CLIPModel

__all__ = ["LLMAdapter", "LLM2CLIPModel"]
