"""Config of the CLIP baseline: a CLIP trained with its *own* text tower on the same images, for comparing
against LLM2CLIP (the quickstart's baseline column)."""
from __future__ import annotations

from dataclasses import dataclass, field

from llm2clip.config import ConfigError
from llm2clip.schema import RunConfig, TrainConfig
from llm2clip.schema_stage2 import Stage2DataConfig, Stage2OptimConfig


@dataclass
class BaselineModelConfig:
    path: str = ""  # a local HF CLIPModel folder (vision + text towers + tokenizer) to start from
    max_length: int = 77  # text tokens, as CLIP's text transformer
    local_loss: bool = True
    gather_with_grad: bool = True

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("model.path must name a local HF CLIPModel folder (with its tokenizer)")
        if self.max_length < 2:
            raise ConfigError("model.max_length must be >= 2")


@dataclass
class ClipBaselineConfig:
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/clip_baseline"))
    model: BaselineModelConfig = field(default_factory=BaselineModelConfig)
    # the same stream as stage 2 in caption mode; short captions only by default (no sidecars are read)
    data: Stage2DataConfig = field(default_factory=lambda: Stage2DataConfig(dense_ratio=0.0))
    optim: Stage2OptimConfig = field(default_factory=Stage2OptimConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(deepspeed_config="ds_configs/zero1_bf16.json",
                                                                   micro_batch_size=512, eval_every=0))
