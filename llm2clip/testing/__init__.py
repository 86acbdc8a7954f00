"""Test support: tiny random models and tokenizers (synthetic data lives in llm2clip.data.synthetic).

Submodules import transformers lazily; import ``llm2clip.testing.tiny_models`` explicitly.
"""
