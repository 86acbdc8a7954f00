"""llm2clip: a production trainer for LLM2CLIP (an LLM as CLIP's text tower). See README.md."""

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """A trained stage-2 model with `preprocess`, `encode_image`, `encode_text`; see llm2clip/api.py."""
    from llm2clip.api import load_model as _load

    return _load(*args, **kwargs)
