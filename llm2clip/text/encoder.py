"""A text encoder from any local HF model folder: decoder LLMs made bidirectional, or BERT-family.

Bidirectional attention uses transformers' public interface: the config attribute `is_causal=False`,
which the attention code and the mask builder both honour (eager, sdpa and flash-attn, with and
without padding). Packed rows use the other public route: a ready 4D float mask (returned as-is by
the mask builder) or flash-attn's varlen kwargs. Nothing private is patched.
"""
from __future__ import annotations

import importlib.util
import inspect
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


def resolve_attn_implementation(requested: str, dtype: torch.dtype | None = None) -> str:
    """`auto` takes the fastest that works: flash-attn 2 on GPU for bf16/fp16 if importable, else sdpa.
    An explicit flash-attn request that cannot run (not installed, no GPU, fp32) is a clear error."""
    has_flash = importlib.util.find_spec("flash_attn") is not None
    half = dtype in (None, torch.bfloat16, torch.float16)
    if requested == "flash_attention_2":
        if not has_flash:
            raise ImportError("text.attn_implementation=flash_attention_2 but the flash-attn package is not "
                              "installed; install the GPU extra (see README, 'GPU extras') or use 'auto'/'sdpa'")
        if not torch.cuda.is_available():
            raise RuntimeError("text.attn_implementation=flash_attention_2 needs a CUDA GPU; use 'sdpa' on CPU")
        if not half:
            raise ValueError(f"text.attn_implementation=flash_attention_2 runs in bf16/fp16 only, but the model would "
                             f"load in {str(dtype).replace('torch.', '')}; set text.dtype=auto (bf16 on GPU) or "
                             "bfloat16, or text.attn_implementation=sdpa")
        return requested
    if requested == "auto":
        # sdpa dispatches to its own flash kernel on GPU for bf16 when the mask allows it
        return "flash_attention_2" if (has_flash and torch.cuda.is_available() and half) else "sdpa"
    return requested


def resolve_dtype(name: str) -> torch.dtype:
    """The one dtype policy for frozen encoders: auto = bf16 on GPU, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_type(path: str) -> str:
    return json.loads((Path(path) / "config.json").read_text()).get("model_type", "")


def load_backbone(cfg: TextEncoderConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the transformer body (no LM head) with the configured attention direction; a `lora_path`
    adapter is merged into the weights (also when ZeRO-3 has partitioned them while loading)."""
    from transformers import AutoConfig, AutoModel

    path = check_model_folder(cfg.model_path, "text model")
    hf_cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    mtype = hf_cfg.model_type
    if mtype not in ENCODER_ONLY:
        # The public switch: attention modules and create_causal_mask read config.is_causal.
        hf_cfg.is_causal = cfg.attention == "causal"
    dtype = dtype or resolve_dtype(cfg.dtype)
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype)
    model = AutoModel.from_pretrained(str(path), config=hf_cfg, attn_implementation=attn,
                                      dtype=dtype, local_files_only=True)
    if cfg.lora_path:
        check_model_folder_lora(cfg.lora_path)
        model = merge_lora(model, cfg.lora_path)
    return model


def merge_lora(model: nn.Module, lora_path: str) -> nn.Module:
    """Base + a peft LoRA adapter -> a plain model with the adapter merged into its weights.

    Under ZeRO-3 the base weights are partitioned (each rank holds a slice, the local tensor is
    empty), so peft's merge_and_unload cannot run on them directly: each adapted layer's base
    weights are gathered whole (deepspeed.zero.GatheredParameters), merged there, and re-partitioned
    from rank 0's copy on exit; then the adapter modules are removed (peft's `unload`)."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, lora_path)
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        return peft_model.merge_and_unload()
    import deepspeed
    from peft.tuners.lora import LoraLayer

    for m in peft_model.modules():
        if isinstance(m, LoraLayer):
            base = m.get_base_layer()
            with deepspeed.zero.GatheredParameters(list(base.parameters(recurse=False)), modifier_rank=0):
                m.merge()
    return peft_model.unload()


def check_model_folder_lora(path: str) -> None:
    p = Path(path)
    if not (p / "adapter_config.json").is_file():
        raise ModelFolderError(f"LoRA adapter folder {p} has no adapter_config.json")


# model types whose absolute positions start at pad_token_id + 1 (fairseq convention)
_ROBERTA_POSITIONS = {"roberta", "xlm-roberta", "camembert", "roberta-prelayernorm", "xlm-roberta-xl", "data2vec-text"}


def segment_positions(seg: torch.Tensor) -> torch.Tensor:
    """[R, W] segment ids -> [R, W] position of each token within its run of equal ids (0, 1, ...):
    restarts per caption in a packed row, and counts from the first real token in a padded row."""
    W = seg.shape[1]
    idx = torch.arange(W, device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def block_mask(seg: torch.Tensor, dtype: torch.dtype, causal: bool = False) -> torch.Tensor:
    """[R, W] segment ids -> [R, 1, W, W] additive float mask: 0 within a caption, dtype-min across
    captions and to/from padding (a pad token sees only itself, so no row is all-masked). A float
    mask, because eager attention adds the mask to the scores (a boolean one would leak)."""
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0)
    W = seg.shape[1]
    eye = torch.eye(W, dtype=torch.bool, device=seg.device)
    if causal:
        same &= torch.ones(W, W, dtype=torch.bool, device=seg.device).tril()
    allowed = same | eye
    zero = torch.zeros((), dtype=dtype, device=seg.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)[:, None]


def pool_segments(hidden: torch.Tensor, seg: torch.Tensor, pool_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the pooled tokens of each caption: hidden [..., H], seg / pool_mask [...] -> [n, H]
    float32. (cls / last pooling are a one-token pool_mask, see PromptTokenizer.)"""
    sel = (pool_mask > 0) & (seg >= 0)
    h = hidden[sel].float()
    s = seg[sel]
    sums = torch.zeros(n, hidden.shape[-1], dtype=torch.float32, device=hidden.device).index_add(0, s, h)
    counts = torch.bincount(s, minlength=n).clamp_min(1).to(sums.dtype)
    return sums / counts[:, None]


def pool(hidden: torch.Tensor, batch: TextBatch, pooling: str = "mean") -> torch.Tensor:
    """hidden [R, W, H] of a padded batch -> [R, H]: mean over the pooled tokens (batch.embed_mask)."""
    R = hidden.shape[0]
    seg = torch.where(batch.attention_mask.bool(), torch.arange(R, device=hidden.device)[:, None], -1)
    return pool_segments(hidden, seg, batch.embed_mask, R)


class TextEncoder(nn.Module):
    """backbone + pooling. forward(input_ids, attention_mask, embed_mask[, seg_ids]) -> [n, H] pooled
    float32 embeddings (not normalised), one per caption in seg order (row order when padded).

    Positions are passed explicitly, counted from each caption's first token, so absolute-position
    encoders (BERT, RoBERTa, DistilBERT...) give a caption the same embedding whatever else is in its
    batch and on either padding side. Packed rows (seg_ids given): flash-attn gets the varlen route
    (rows flattened, cu_seqlens, positions restarting per caption); eager/sdpa a block-diagonal mask.
    """

    def __init__(self, backbone: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
        c = base.config
        params = inspect.signature(base.forward).parameters
        self.encoder_only = c.model_type in ENCODER_ONLY
        self.takes_positions = "position_ids" in params
        self.takes_token_types = "token_type_ids" in params
        self.pos_offset = (c.pad_token_id + 1) if c.model_type in _ROBERTA_POSITIONS else 0
        self.causal = bool(getattr(c, "is_causal", not self.encoder_only)) and not self.encoder_only

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.backbone.config, "_attn_implementation", "") or "")

    @property
    def can_pack(self) -> bool:
        """Packing needs explicit positions; flash-attn's varlen route is used for decoders only."""
        return self.takes_positions and not (self.encoder_only and self.attn_implementation.startswith("flash"))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, embed_mask: torch.Tensor,
                seg_ids: torch.Tensor | None = None) -> torch.Tensor:
        if seg_ids is None:
            n = input_ids.shape[0]
            seg = torch.where(attention_mask.bool(), torch.arange(n, device=input_ids.device)[:, None], -1)
        else:
            seg, n = seg_ids, int(seg_ids.max()) + 1
        kw: dict = {}
        if self.takes_positions:
            kw["position_ids"] = segment_positions(seg) + self.pos_offset
        if self.takes_token_types:  # the buffered default stops at max_position_embeddings
            kw["token_type_ids"] = torch.zeros_like(input_ids)
        if seg_ids is None:
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        elif self.attn_implementation.startswith("flash"):
            keep = seg >= 0  # rows flattened into one sequence; captions stay contiguous, in seg order
            seg = seg[keep][None]
            lengths = torch.bincount(seg[0], minlength=n)
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            L = int(lengths.max())
            kw = {k: v[keep][None] for k, v in kw.items()}
            hidden = self.backbone(input_ids=input_ids[keep][None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                   max_length_q=L, max_length_k=L, **kw).last_hidden_state
            embed_mask = embed_mask[keep][None]
        else:
            dtype = next(self.backbone.parameters()).dtype
            mask = block_mask(seg, dtype if dtype.is_floating_point else torch.float32, self.causal)
            hidden = self.backbone(input_ids=input_ids, attention_mask=mask, **kw).last_hidden_state
        return pool_segments(hidden, seg, embed_mask, n)

    def encode(self, batch: TextBatch) -> torch.Tensor:
        return self(batch.input_ids, batch.attention_mask, batch.embed_mask, batch.seg_ids)


def prompt_tokenizer(cfg: TextEncoderConfig, encoder_only: bool) -> PromptTokenizer:
    tok = load_tokenizer(cfg.tokenizer_path or cfg.model_path, cfg.pad_token, cfg.padding_side)
    return PromptTokenizer(tok, cfg.template, cfg.max_length, cfg.pooling, cfg.pool_scope,
                           pool_special_tokens(cfg, encoder_only))


def pool_special_tokens(cfg: TextEncoderConfig, encoder_only: bool) -> bool:
    """text.pool_special_tokens, auto = on for encoder-only models (sentence-transformers' mean over
    every non-pad token), off for decoders (llm2vec leaves BOS out)."""
    return encoder_only if cfg.pool_special_tokens == "auto" else cfg.pool_special_tokens == "yes"


def build_text_encoder(cfg: TextEncoderConfig, dtype: torch.dtype | None = None):
    """(TextEncoder, PromptTokenizer) from a local folder, frozen-or-not left to the caller."""
    check_model_folder(cfg.model_path, "text model")
    ptok = prompt_tokenizer(cfg, model_type(cfg.model_path) in ENCODER_ONLY)
    backbone = load_backbone(cfg, dtype)
    enc = TextEncoder(backbone, cfg.pooling)
    if enc.backbone.config.vocab_size < len(ptok.tok):
        raise ValueError(f"tokenizer at {cfg.tokenizer_path or cfg.model_path} has {len(ptok.tok)} tokens but the "
                         f"model's vocab_size is {enc.backbone.config.vocab_size}: tokenizer and model do not match")
    return enc, ptok


def default_lora_targets(backbone: nn.Module, requested: list[str]) -> list[str] | str:
    """Requested module names that exist in this model; BERT-style names when none do."""
    names = {n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)}
    hit = [t for t in requested if t in names]
    if hit:
        return hit
    return "all-linear"
