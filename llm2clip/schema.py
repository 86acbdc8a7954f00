"""Config dataclasses: one per component, composed per task. Defaults follow the paper (METHOD.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llm2clip.config import ConfigError

# Prompt templates per model family; `{instruction}` and `{text}` are filled in, and only the
# `{text}` tokens enter mean pooling. "llama3" is the chat header the authors wrap captions in.
TEMPLATES = {
    "none": "{instruction}{text}",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n{instruction}{text}<|eot_id|>",
    "mistral": "[INST] {instruction}{text} [/INST]",
    "qwen2": "<|im_start|>user\n{instruction}{text}<|im_end|>",
}


@dataclass
class RunConfig:
    output_dir: str = "runs/stage1"
    seed: int = 0
    resume: str = "auto"  # "auto": newest complete checkpoint if any | "none" | a checkpoint folder
    log_every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on GPU; errors on ops without one)
    # On resume, start the data streams from the beginning instead of the checkpoint's position (needed when
    # the world size or loader worker count changed: saved stream positions cannot be remapped exactly).
    reset_data_position: bool = False
    # take over the run directory's lock even when its holder ran on another host and is not this Slurm job
    # (its pid cannot be checked from here); only when that job is known to be gone
    break_lock: bool = False

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("run.output_dir must be set")
        if self.log_every < 1:
            raise ConfigError("run.log_every must be >= 1")


@dataclass
class TextEncoderConfig:
    model_path: str = ""  # local HF folder (decoder LLM or BERT-family encoder); never a hub id
    tokenizer_path: str = ""  # defaults to model_path
    lora_path: str = ""  # a peft adapter folder applied on top (merged for inference)
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    pooling: Literal["mean", "last", "cls"] = "mean"
    # mean pooling over: the caption + the template's closing tokens (llm2vec's embed mask, e.g. llama3's
    # <|eot_id|>) | the caption tokens only
    pool_scope: Literal["llm2vec", "caption"] = "llm2vec"
    # also pool the tokenizer's special tokens ([CLS]/[SEP], BOS); auto = yes for encoder-only models
    # (sentence-transformers' mean over every non-pad token), no for decoders (llm2vec)
    pool_special_tokens: Literal["auto", "yes", "no"] = "auto"
    template: str = "none"  # a key of TEMPLATES or a literal string with {instruction} and {text}
    max_length: int = 512
    padding_side: Literal["left", "right"] = "left"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    pad_token: Literal["error", "eos"] = "error"  # what to do when the tokenizer has no pad token
    gradient_checkpointing: bool = False
    # several captions per row up to the token budget, no padding (auto = on where the model allows it)
    packing: Literal["auto", "on", "off"] = "auto"
    empty_captions: Literal["error", "skip"] = "error"  # skip: leave them out and count them

    def validate(self) -> None:
        if not self.model_path:
            raise ConfigError("text.model_path must name a local model folder")
        tpl = TEMPLATES.get(self.template, self.template)
        if "{text}" not in tpl:
            raise ConfigError(f"text.template {self.template!r} is neither a preset {sorted(TEMPLATES)} "
                              "nor a string containing '{text}'")
        if self.max_length < 8:
            raise ConfigError("text.max_length must be >= 8")


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

    def validate(self) -> None:
        if self.enabled and self.r <= 0:
            raise ConfigError("lora.r must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("lora.dropout must be in [0, 1)")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 300
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")
        if len(self.betas) != 2:
            raise ConfigError("optim.betas must have two values")


@dataclass
class TrainConfig:
    max_steps: int = 10000
    micro_batch_size: int = 64  # per rank
    grad_accum: int = 1
    eval_every: int = 500
    save_every: int = 1000
    keep_last: int = 2
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed_config: str = "ds_configs/zero3_bf16.json"  # a path, or relative to the llm2clip checkout
    zero_stage: Optional[int] = None  # override the stage in the DeepSpeed file
    num_workers: int = 1
    stop_after: Optional[int] = None  # checkpoint and exit 0 at this step, keeping max_steps' lr schedule
    # A non-finite loss or gradient: "fail" stops naming the step, rank(s) and sample keys; "skip" discards
    # that optimizer step (weights and optimizer state untouched), counts and logs it, and fails after
    # max_consecutive_skips skipped steps in a row. skip needs ZeRO stage 1 or 2 (DeepSpeed discards there).
    on_nonfinite: Literal["fail", "skip"] = "fail"
    max_consecutive_skips: int = 5

    def validate(self) -> None:
        if self.max_steps < 1 or self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("train.max_steps, train.micro_batch_size and train.grad_accum must be >= 1")
        if self.max_consecutive_skips < 1:
            raise ConfigError("train.max_consecutive_skips must be >= 1")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("train.zero_stage must be 0, 1, 2 or 3")


@dataclass
class PairSourceConfig:
    """One source of stage-1 caption pairs."""
    kind: Literal["shards", "jsonl"] = "shards"
    path: str = ""  # shard glob / brace list (kind=shards) or JSONL file(s) (kind=jsonl)
    weight: Optional[float] = None  # sampling weight; None: by size (the source's samples / pairs), as the authors
    # query instruction of this source (llm2vec keeps one per E5 dataset); None: data.query_instruction
    instruction: Optional[str] = None
    # kind=shards: caption fields that may form positives ("txt" = the .txt file, "json:NAME" = a .json field)
    fields: list[str] = field(default_factory=lambda: ["txt", "json:short_alt", "json:dense", "json:dense_alt"])

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("data.sources[].path must be set")
        if self.kind == "shards" and len(self.fields) < 2:
            raise ConfigError("a shards source needs at least two caption fields to form positive pairs")
        if self.weight is not None and self.weight <= 0:
            raise ConfigError("data.sources[].weight must be > 0 (or unset: by size)")


@dataclass
class Stage1DataConfig:
    sources: list[PairSourceConfig] = field(default_factory=list)
    query_instruction: str = "Given a caption, retrieve a similar relevant caption: "
    doc_instruction: str = ""
    hard_negatives: bool = True
    single_source_batches: bool = True  # every global batch from one source, as the authors do
    # Caption records per shuffle block of each rank, read interleaved from 4 open shards and emitted in a seeded
    # order; hard negatives come from the same block (other shards too). Memory: the captions of this many samples.
    shuffle_buffer: int = 1000
    # micro-batches read, tokenised and packed ahead of the step in a background thread (overlapping it);
    # 0 = in the training thread
    prefetch: int = 2
    val_path: str = ""  # held-out image shards for CRA
    # CRA: query, answer, then further captions that join the gallery (list every caption for the paper's protocol)
    val_fields: list[str] = field(default_factory=lambda: ["txt", "json:short_alt"])
    val_max_samples: int = 1000

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources must list at least one caption source")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1 (1 = no sample shuffling)")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch={self.prefetch} must be >= 0 (micro-batches prepared ahead; 0 = none)")


@dataclass
class ContrastiveConfig:
    temperature: float = 0.02
    mask_identical: bool = True  # identical strings in a batch are not negatives of each other

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("loss.temperature must be > 0")


@dataclass
class ChunkedTrainConfig(TrainConfig):
    """TrainConfig of the contrastive trainers (stage 1, stage 2)."""
    # GradCache (llm2clip/gradcache.py): embed the micro-batch this many items at a time, so activation memory
    # is one chunk's while the loss and gradients stay those of the whole global batch. 0 = one pass.
    contrastive_chunk: int = 0

    def validate(self) -> None:
        super().validate()
        c = self.contrastive_chunk
        if c < 0 or (c > 0 and self.micro_batch_size % c):
            raise ConfigError(f"train.contrastive_chunk={c} must be 0 (off) or divide train.micro_batch_size="
                              f"{self.micro_batch_size}; pick a divisor such as "
                              f"{max(d for d in range(1, max(c, 1) + 1) if self.micro_batch_size % d == 0)}")


@dataclass
class Stage1TrainConfig(ChunkedTrainConfig):
    # where the frozen base lives: "zero3" partitions it over the ranks (every layer all-gathered in forward,
    # backward and recompute); "replicated" keeps it whole on every rank with only the LoRA parameters, their
    # gradients and optimizer state under ZeRO-2 (ZeRO-1 if the DeepSpeed file says 1); "auto" takes
    # replicated when the memory plan (llm2clip/memory_plan.py) fits the device, else zero3, and logs why
    strategy: Literal["auto", "zero3", "replicated"] = "auto"

    def validate(self) -> None:
        super().validate()
        if self.strategy == "replicated" and self.zero_stage == 3:
            raise ConfigError("train.strategy=replicated contradicts train.zero_stage=3; drop train.zero_stage "
                              "or use train.strategy=zero3")
        if self.strategy == "zero3" and self.zero_stage not in (None, 3):
            raise ConfigError(f"train.strategy=zero3 contradicts train.zero_stage={self.zero_stage}; drop "
                              "train.zero_stage or use train.strategy=replicated")


@dataclass
class Stage1Config:
    run: RunConfig = field(default_factory=RunConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: Stage1DataConfig = field(default_factory=Stage1DataConfig)
    loss: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: Stage1TrainConfig = field(default_factory=lambda: Stage1TrainConfig())
