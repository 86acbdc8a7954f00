"""Stage-2 config: vision tower + adapter trained on precomputed (or online) LLM caption embeddings."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llm2clip.config import ConfigError
from llm2clip.schema import ChunkedTrainConfig, OptimConfig, RunConfig, TextEncoderConfig
from llm2clip.schema_embed import SidecarConfig


@dataclass
class VisionConfig:
    kind: Literal["auto", "hf_clip", "hf_siglip", "timm"] = "auto"
    path: str = ""  # local folder of a pretrained CLIP / SigLIP (vision) model
    image_size: Optional[int] = None  # default: the tower's
    freeze: bool = False
    freeze_first_k: int = 0  # freeze the embeddings + the first k blocks
    gradient_checkpointing: bool = False
    use_pretrained_proj: bool = False  # feed the old CLIP projection into the new one (paper: drop it)

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("vision.path must name a local vision model folder")


@dataclass
class ModelConfig:
    embed_dim: int = 1280
    llm_dim: Optional[int] = None  # width of the LLM embeddings; default: read from the sidecars
    adapter_blocks: int = 4
    adapter_expansion: int = 2
    adapter_dropout: float = 0.0
    loss: Literal["clip", "siglip"] = "clip"
    local_loss: bool = True
    gather_with_grad: bool = True
    save_initial: bool = False  # also export the model before any step (<run>/export/initial_model): a baseline
    # log logit scale when the vision checkpoint has no learned one (timm EVA02 folders without the
    # open_clip weights, vision-only folders); the checkpoint's own scale always wins (the paper keeps it).
    # None: ln 100 (clip loss; where pretrained CLIPs end), ln 10 (siglip).
    logit_scale_init: Optional[float] = None


@dataclass
class Stage2DataConfig:
    shards: str = ""  # image shards: glob / brace list; several datasets joined by '::'
    weights: list[float] = field(default_factory=list)  # per '::' dataset; default: by sample count
    sidecar: SidecarConfig = field(default_factory=SidecarConfig)
    fingerprint: str = ""  # expected encoder fingerprint; "" = whatever the sidecars agree on
    # As the authors run it: 50/50 between the short and the long *synthetic* captions (ShareGPT4V /
    # DreamLIP, saved by img2dataset as json fields), not the raw alt-text (`txt`: add it to
    # original_fields to mix it in). Paper ablation of the dense share: 75% best, 0% and 100% worst.
    original_fields: list[str] = field(default_factory=lambda: ["json:short_caption"])
    dense_fields: list[str] = field(default_factory=lambda: ["json:dense", "json:dense_alt"])  # synthetic data's names
    dense_ratio: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    num_workers: int = 2
    # Samples per shuffle block of each loader stream, read interleaved from 4 open shards and emitted in a
    # seeded order (see llm2clip/data/streams.py). Memory: this many *encoded* samples (JPEG bytes + one
    # embedding's .npy bytes) per loader worker and dataset; a resume re-reads at most one block. 1 = off.
    shuffle_buffer: int = 2000
    # Train for this many passes over the data: sets train.max_steps from the shards' sample counts.
    # Exact (every sample seen `epochs` times) when shards split evenly over ranks x workers; else a warning.
    epochs: Optional[float] = None
    val_shards: str = ""  # held-out image shards (with sidecars) for retrieval R@1 during training
    val_field: str = "json:dense"
    val_max_samples: int = 500
    missing_sidecars: Literal["error", "embed"] = "error"  # "embed": run the embed step first
    embed_config: str = ""  # embed config used when missing_sidecars=embed

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("data.shards must name the image shards")
        if not 0.0 <= self.dense_ratio <= 1.0:
            raise ConfigError("data.dense_ratio must be in [0, 1]")
        if self.dense_ratio > 0 and not self.dense_fields:
            raise ConfigError("data.dense_ratio > 0 needs data.dense_fields")
        if self.dense_ratio < 1 and not self.original_fields:
            raise ConfigError("data.dense_ratio < 1 needs data.original_fields")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError("data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1")
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1 (1 = no sample shuffling)")
        if self.epochs is not None and self.epochs <= 0:
            raise ConfigError("data.epochs must be > 0")
        if self.missing_sidecars == "embed" and not self.embed_config:
            raise ConfigError("data.missing_sidecars=embed needs data.embed_config (the embed step's YAML)")


@dataclass
class TextSideConfig:
    mode: Literal["offline", "online"] = "offline"  # online: the frozen encoder runs in the loop
    encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(model_path="(unset)"))


@dataclass
class Stage2OptimConfig(OptimConfig):
    lr: float = 1e-5  # the tower's base lr
    head_lr: Optional[float] = None  # visual projection + logit scale; default lr
    adapter_lr: Optional[float] = None  # default lr
    layer_decay: float = 0.85
    weight_decay: float = 0.05
    warmup_steps: int = 0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 5.0


@dataclass
class Stage2Config:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/stage2"))
    vision: VisionConfig = field(default_factory=VisionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextSideConfig = field(default_factory=TextSideConfig)
    data: Stage2DataConfig = field(default_factory=Stage2DataConfig)
    optim: Stage2OptimConfig = field(default_factory=Stage2OptimConfig)
    train: ChunkedTrainConfig = field(default_factory=lambda: ChunkedTrainConfig(
        deepspeed_config="ds_configs/zero1_bf16.json", micro_batch_size=512))

    def validate(self) -> None:
        if self.text.mode == "offline":  # online mode (and the CLIP baseline) read no sidecars
            self.data.sidecar.require_location("data.sidecar")
        if self.text.mode == "online" and self.text.encoder.model_path in ("", "(unset)"):
            raise ConfigError("text.mode=online needs text.encoder.model_path (the stage-1 merged encoder)")
