"""A text encoder from any local HF model folder: decoder LLMs made bidirectional, or BERT-family.

Bidirectional attention uses transformers' public interface: the config attribute `is_causal=False`,
which the attention code and the mask builder both honour (eager, sdpa and flash-attn, with and
without padding). Nothing private is patched.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from llm2clip.schema import TextEncoderConfig
from llm2clip.text.tokenize import PromptTokenizer, TextBatch, load_tokenizer

ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "jina_bert", "modernbert", "electra", "deberta-v2"}


class ModelFolderError(FileNotFoundError):
    pass


def check_model_folder(path: str, what: str = "model") -> Path:
    p = Path(path)
    if not p.is_dir():
        raise ModelFolderError(f"{what} folder not found: {p} (models load from local folders only; "
                               "download the weights once with `huggingface-cli download` and pass the path)")
    if not (p / "config.json").is_file():
        raise ModelFolderError(f"{what} folder {p} has no config.json: is this a HuggingFace model folder?")
    return p


def resolve_attn_implementation(requested: str) -> str:
    """`auto` takes the fastest available: flash-attn 2 on GPU if importable, else sdpa."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2":
        if not has_flash:
            raise ImportError("text.attn_implementation=flash_attention_2 but the flash-attn package is not "
                              "installed; install the GPU extra (see README, 'GPU extras') or use 'auto'/'sdpa'")
        if not torch.cuda.is_available():
            raise RuntimeError("text.attn_implementation=flash_attention_2 needs a CUDA GPU; use 'sdpa' on CPU")
        return requested
    if requested == "auto":
        # sdpa dispatches to its own flash kernel on GPU for bf16 when the mask allows it
        return "flash_attention_2" if (has_flash and torch.cuda.is_available()) else "sdpa"
    return requested


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_type(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")


def load_backbone(cfg: TextEncoderConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the transformer body (no LM head) with the configured attention direction."""
    from transformers import AutoConfig, AutoModel

    path = check_model_folder(cfg.model_path, "text model")
    hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    mtype = hf_cfg.model_type
    if mtype not in ENCODER_ONLY:
        # The public switch: attention modules and create_causal_mask read config.is_causal.
        hf_cfg.is_causal = cfg.attention == "causal"
    attn = resolve_attn_implementation(cfg.attn_implementation)
    model = AutoModel.from_pretrained(str(path), config=hf_cfg, attn_implementation=attn,
                                      dtype=dtype or resolve_dtype(cfg.dtype), local_files_only=True)
    if cfg.lora_path:
        from peft import PeftModel

        check_model_folder_lora(cfg.lora_path)
        model = PeftModel.from_pretrained(model, cfg.lora_path).merge_and_unload()
    return model


def check_model_folder_lora(path: str) -> None:
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ModelFolderError(f"LoRA adapter folder {p} has no adapter_config.json")


def pool(hidden: torch.Tensor, batch: TextBatch, pooling: str) -> torch.Tensor:
    """hidden [B,T,H] -> [B,H]. mean: over caption tokens (embed_mask); last: last real token; cls: first."""
    if pooling == "mean":
        m = batch.embed_mask.to(hidden.dtype).unsqueeze(-1)
        denom = m.sum(1).clamp_min(1.0)
        return (hidden * m).sum(1) / denom
    if pooling == "cls":
        idx = batch.embed_mask.float().argmax(1)
    else:  # last real token; works for left and right padding
        T = batch.attention_mask.shape[1]
        pos = torch.arange(T, device=hidden.device).expand_as(batch.attention_mask)
        idx = (pos * batch.attention_mask).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


class TextEncoder(nn.Module):
    """backbone + pooling. forward(TextBatch) -> [B, H] pooled (not normalised) embeddings."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        batch = TextBatch(input_ids, attention_mask, embed_mask)
        return pool(out.last_hidden_state, batch, self.pooling)

    def encode(self, batch: TextBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.attention_mask, batch.embed_mask)


def build_text_encoder(cfg: TextEncoderConfig, dtype: torch.dtype | None = None):
    """(TextEncoder, PromptTokenizer) from a local folder, frozen-or-not left to the caller."""
    tok = load_tokenizer(cfg.tokenizer_path or cfg.model_path, cfg.pad_token, cfg.padding_side)
    backbone = load_backbone(cfg, dtype)
    enc = TextEncoder(backbone, cfg.pooling)
    if enc.backbone.config.vocab_size < len(tok):
        raise ValueError(f"tokenizer at {cfg.tokenizer_path or cfg.model_path} has {len(tok)} tokens but the model's "
                         f"vocab_size is {enc.backbone.config.vocab_size}: tokenizer and model do not match")
    return enc, PromptTokenizer(tok, cfg.template, cfg.max_length, cfg.pooling)


def default_lora_targets(backbone: nn.Module, requested: list[str]) -> list[str] | str:
    """Requested module names that exist in this model; BERT-style names when none do."""
    names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    hit = [t for t in requested if t in names]
    if hit:
        return hit
    return "all-linear"
