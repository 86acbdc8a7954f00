"""Tiny random models saved through the real Hugging Face path (config class -> model -> save_pretrained).

They stand in for Llama/Mistral/Qwen2/BERT text encoders, a pretrained CLIP and a SigLIP vision tower
in tests and CPU smoke runs. Weights are random but deterministic given ``seed`` (drawn under a
forked torch RNG, so the caller's global RNG is untouched); the tokenizer is copied next to the
weights so ``AutoTokenizer.from_pretrained(model_dir)`` works offline, like a hub checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

LLM_FAMILIES = ("llama", "mistral", "qwen2", "bert")
VISION_FAMILIES = ("clip", "siglip")
ALL_FAMILIES = LLM_FAMILIES + VISION_FAMILIES


def _load_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@contextmanager
def _seeded(seed: int):
    """Draw from a private torch RNG seeded with ``seed``; the global RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def make_tiny_llm(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, family: str = "llama",
                  hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                  intermediate: int = 128, seed: int = 0, max_position: int = 512) -> Path:
    """Build a random ``family`` model sized to the tokenizer, save it (safetensors) and the tokenizer.

    llama/mistral/qwen2 -> ``AutoModelForCausalLM``; bert -> ``BertModel`` (``kv_heads`` unused).
    Returns ``out_dir``; reload with ``AutoModelForCausalLM``/``AutoModel.from_pretrained(out_dir)``.
    """
    import transformers as tf

    tok = _load_tokenizer(tokenizer_dir)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=tok.eos_token_id)
    size = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=intermediate, max_position_embeddings=max_position)
    decoder_configs = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    if family not in decoder_configs and family != "bert":
        raise ValueError(f"unknown family {family!r}; choose one of {LLM_FAMILIES}")
    with _seeded(seed):
        if family == "bert":
            model = tf.BertModel(tf.BertConfig(**ids, **size))
        else:
            config = decoder_configs[family](**ids, **size, num_key_value_heads=kv_heads,
                                             tie_word_embeddings=False)
            model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _clip_tokenizer(tokenizer_dir, max_length: int):
    """The test tokenizer, but wrapping text as ``<s> text </s>`` like CLIP's: CLIPTextModel pools the
    hidden state at the first eos token, so without an appended eos it would pool ``<s>``."""
    from tokenizers import processors

    tok = _load_tokenizer(tokenizer_dir)
    bos, eos = tok.bos_token, tok.eos_token
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B {eos}",
        special_tokens=[(bos, tok.bos_token_id), (eos, tok.eos_token_id)])
    tok.model_max_length = max_length
    return tok


def make_tiny_clip(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, image_size: int = 64,
                   patch: int = 8, hidden: int = 64, layers: int = 2, heads: int = 4,
                   projection_dim: int = 64, seed: int = 0) -> Path:
    """A full random ``CLIPModel`` (vision + text tower) with a CLIP-style tokenizer (``<s> … </s>``,
    77 tokens) and a ``CLIPImageProcessor`` (resize shortest edge + centre crop to ``image_size``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = _clip_tokenizer(tokenizer_dir, max_length=77)
    if tok.eos_token_id == 2:
        # CLIPTextTransformer treats eos_token_id == 2 as the legacy config and pools at argmax(ids).
        raise ValueError("tokenizer eos id 2 triggers CLIP's legacy pooling; use a tokenizer with eos != 2")
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    with _seeded(seed):
        model = CLIPModel(config)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out


def make_tiny_siglip_vision(out_dir: str | os.PathLike, image_size: int = 64, patch: int = 8,
                            hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    """A random ``SiglipVisionModel`` (with its attention-pooling head) and a ``SiglipImageProcessor``."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    config = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                num_attention_heads=heads, image_size=image_size, patch_size=patch)
    with _seeded(seed):
        model = SiglipVisionModel(config)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return out


def save_tokenizer_without_pad(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy the tokenizer at ``src`` to ``dst`` with no pad token (for "tokenizer has no pad" errors)."""
    tok = _load_tokenizer(src)
    tok.pad_token = None
    tok.save_pretrained(str(dst))
    return Path(dst)


def make_tiny_models(tokenizer_dir: str | os.PathLike, out_root: str | os.PathLike,
                     families=ALL_FAMILIES, seed: int = 0) -> dict[str, Path]:
    """Write ``out_root/tiny-<family>`` for each family; returns {family: path}."""
    out_root = Path(out_root)
    paths = {}
    for fam in families:
        out = out_root / f"tiny-{fam}"
        if fam in LLM_FAMILIES:
            paths[fam] = make_tiny_llm(out, tokenizer_dir, family=fam, seed=seed)
        elif fam == "clip":
            paths[fam] = make_tiny_clip(out, tokenizer_dir, seed=seed)
        elif fam == "siglip":
            paths[fam] = make_tiny_siglip_vision(out, seed=seed)
        else:
            raise ValueError(f"unknown family {fam!r}; choose from {ALL_FAMILIES}")
    return paths
