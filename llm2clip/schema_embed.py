"""Config for the embed step (captions -> sidecar embedding shards) and the sidecar location that
stage 2 shares with it. Same conventions as llm2clip/schema.py: one dataclass per section,
`validate()` raising ConfigError that names the key."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from llm2clip.config import ConfigError
from llm2clip.schema import TextEncoderConfig

_FIELD_SPEC = re.compile(r"^(json:.+|[A-Za-z0-9_]+)$")


def field_name(spec: str) -> str:
    """Member name of a caption field spec: "txt" -> "txt", "json:dense_alt" -> "dense_alt",
    "json:meta.caption" -> "meta_caption". Anything outside [a-z0-9_-] becomes "_" (a dot would end
    the WebDataset key) and letters are lower-cased (WebDataset readers lower-case extensions)."""
    base = spec[5:] if spec.startswith("json:") else spec
    return re.sub(r"[^a-z0-9_-]", "_", base.lower())


@dataclass
class SidecarConfig:
    """Where the sidecar of an image shard lives (shared by embed and stage 2).

    - out_dir set: `<out_dir>/<image shard path relative to image_root, with suffix>.tar`; with
      image_root empty the sidecars are flat (`<out_dir>/<basename>`).
    - out_dir empty: beside the image shard, `X.tar` -> `X<suffix>.tar` (suffix required).
    """
    out_dir: str = ""
    image_root: str = ""
    suffix: str = ""

    def require_location(self, key: str) -> None:
        """For the configs that read or write sidecars (`key`: where this section sits, e.g. "output")."""
        if not self.out_dir and not self.suffix:
            raise ConfigError(f"set {key}.out_dir (sidecars in a separate tree) or {key}.suffix (sidecars beside "
                              "the image shards, e.g. suffix: _emb -> X_emb.tar); with neither, the sidecar of X.tar "
                              "would be X.tar itself")

    def validate(self) -> None:
        if "/" in self.suffix or self.suffix.endswith(".tar") or self.suffix.startswith("."):
            raise ConfigError(f"output.suffix={self.suffix!r} must be a plain name suffix such as '_emb' "
                              "(no '/', no leading '.', no '.tar')")
        if self.image_root and not self.out_dir:
            raise ConfigError("output.image_root only applies with output.out_dir (sidecars beside the images "
                              "need no root)")


@dataclass
class EmbedOutputConfig(SidecarConfig):
    dtype: Literal["float16", "float32"] = "float16"  # of the stored vectors (.npy); compute dtype is text.dtype
    overwrite: bool = False  # recompute every shard of the job, even valid ones or another encoder's
    verify: Literal["sha256", "size"] = "sha256"  # how a rerun checks finished shards (size: no re-read)

    def validate(self) -> None:
        super().validate()
        self.require_location("output")


@dataclass
class EmbedDataConfig:
    # image shards: glob / brace list; several datasets joined by '::'
    shards: str = ""
    # caption fields, each becomes one member per sample: "txt" (the .txt member) or "json:NAME"
    fields: list[str] = field(default_factory=lambda: ["txt"])
    instruction: str = ""  # prepended to every caption (METHOD.md: none for the embed step)

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("data.shards must name the image shards (glob / brace list, '::' between datasets)")
        if not self.fields:
            raise ConfigError("data.fields must list at least one caption field (e.g. [txt, json:dense])")
        seen: dict[str, str] = {}
        for spec in self.fields:
            if not _FIELD_SPEC.match(spec) or spec in ("jpg", "jpeg", "png", "webp", "npy"):
                raise ConfigError(f"data.fields: {spec!r} is not a caption field; use 'txt' or 'json:NAME'")
            name = field_name(spec)
            if name in seen:
                raise ConfigError(f"data.fields: {seen[name]!r} and {spec!r} would both be stored as "
                                  f"'KEY.{name}.npy'; embed them into different outputs")
            seen[name] = spec


@dataclass
class EmbedBatchConfig:
    token_budget: int = 16384  # max padded tokens (batch x longest) per forward pass
    max_batch_size: int = 1024
    # captions of this many consecutive shards (in the job's global shard order) are batched together;
    # windows, not shards, go to ranks, so any value gives the same bytes for any world size. 1: packing
    # (the default) pads 2.0 % on the demo data already; with text.packing=off larger windows pad less
    # (14.7 % at 1, 6.3 % at 4, docs/PERFORMANCE.md) at the cost of coarser load balancing
    window_shards: int = 1
    prefetch: bool = True  # read + tokenise the next window in a thread while the model runs

    def validate(self) -> None:
        if self.token_budget < 8:
            raise ConfigError("batch.token_budget must be >= 8 tokens")
        if self.max_batch_size < 1 or self.window_shards < 1:
            raise ConfigError("batch.max_batch_size and batch.window_shards must be >= 1")


@dataclass
class EmbedRunConfig:
    progress_bar: bool = True  # tqdm on rank 0 (captions/s, tokens/s, ETA)
    log_every_s: float = 60.0  # progress log lines when the bar is off
    summary_path: str = ""  # JSON summary; "" = <out_dir>/embed_summary.json (none when out_dir is empty)


@dataclass
class EmbedConfig:
    run: EmbedRunConfig = field(default_factory=EmbedRunConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    data: EmbedDataConfig = field(default_factory=EmbedDataConfig)
    output: EmbedOutputConfig = field(default_factory=EmbedOutputConfig)
    batch: EmbedBatchConfig = field(default_factory=EmbedBatchConfig)
