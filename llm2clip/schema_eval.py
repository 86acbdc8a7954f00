"""Config for zero-shot evaluation (tools/eval_zero_shot.py). Same conventions as llm2clip/schema.py.

Models, datasets and CRA sets are mappings keyed by the name shown in the result table, so any
entry is reachable with a dotted override: `--set models.ours.text.model_path=/x/merged`.

    models:                      # columns of the table, in this order
      clip: {kind: hf_clip, path: models/clip-vit-l-14}
      ours: {kind: llm2clip, path: runs/stage2/export/model}
    datasets:                    # zero-shot classification or retrieval, by what the reader returns
      coco: {kind: karpathy, path: data/dataset_coco.json, options: {images_root: data/coco}}
      imagenet: {kind: imagefolder, path: data/imagenet/val, templates: [openai80, simple]}
    cra:                         # caption-only sets: caption retrieval accuracy of every model's text side
      val: {kind: shards, path: "data/val/shard-*.tar", fields: [txt, "json:short_alt"]}
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from llm2clip.config import ConfigError
from llm2clip.schema import TextEncoderConfig

MODEL_KINDS = {
    "llm2clip": "a stage-2 export folder (llm2clip_config.json + model.safetensors); text goes through the "
                "stage-1 encoder named in its config (or the text feature cache) and the adapter",
    "hf_clip": "a Hugging Face CLIP folder (CLIPModel + tokenizer + preprocessor_config.json), the baseline",
    "text": "a text encoder folder (stage-1 merged export or a base LLM), for CRA only",
}
CRA_KINDS = {
    "shards": "WebDataset image shards (glob / brace list); caption 1 and 2 = two caption fields of a sample",
    "jsonl": "JSON lines, one caption pair per line (two keys, default caption1/caption2)",
    "karpathy": "a Karpathy split JSON (COCO/Flickr); caption 1 and 2 = the first two sentences of an image",
}
CRA_DEFAULT_FIELDS = {"shards": ["txt", "json:short_alt"], "jsonl": ["caption1", "caption2"], "karpathy": []}
TEXT_OVERRIDE_KEYS = [f.name for f in dataclasses.fields(TextEncoderConfig)]


def _check_choice(where: str, value: str, choices: dict[str, str]) -> None:
    if value not in choices:
        listing = "; ".join(f"{k}: {v}" for k, v in choices.items())
        raise ConfigError(f"{where}: {value!r} is not a valid kind. Valid kinds -- {listing}")


@dataclass
class EvalModelConfig:
    kind: str = ""  # llm2clip | hf_clip | text (see MODEL_KINDS)
    path: str = ""
    # TextEncoderConfig fields that override what the model records (llm2clip: its text_encoder info;
    # text: the folder's llm2clip_text.json), e.g. {model_path: ..., lora_path: ..., dtype: bfloat16}
    text: dict[str, Any] = field(default_factory=dict)
    instruction: Optional[str] = None  # prepended to captions; default: what stage 2 embedded with ("" for text)
    # llm2clip: refuse a text encoder whose content fingerprint differs from the one stage 2 trained on
    check_fingerprint: bool = True

    def validate(self) -> None:
        _check_choice("kind", self.kind, MODEL_KINDS)
        if not self.path:
            raise ConfigError("path must name a local model folder")
        for k in self.text:
            if k not in TEXT_OVERRIDE_KEYS:
                m = difflib.get_close_matches(k, TEXT_OVERRIDE_KEYS, n=1, cutoff=0.5)
                hint = f" Did you mean 'text.{m[0]}'?" if m else f" Valid keys: {', '.join(TEXT_OVERRIDE_KEYS)}."
                raise ConfigError(f"unknown text encoder key 'text.{k}'.{hint}")
        if self.text and self.kind == "hf_clip":
            raise ConfigError("text overrides apply to llm2clip and text models, not hf_clip")


@dataclass
class EvalDatasetConfig:
    kind: str = ""  # a reader of llm2clip.eval.readers.READERS (karpathy, imagefolder, wds_retrieval, ...)
    path: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # reader options: split, images_root, classnames, ...
    # zero-shot classification: template sets, each scored separately: "dataset" (the set's own, the
    # default), "openai80", "openai7", "simple", or a .txt/.json file
    templates: list[str] = field(default_factory=list)
    max_missing_fraction: Optional[float] = None  # default: run.max_missing_fraction

    def validate(self) -> None:
        from llm2clip.eval.readers import READERS

        if self.kind not in READERS:
            raise ConfigError(f"kind: {self.kind!r} is not a dataset kind; valid kinds: {', '.join(sorted(READERS))}"
                              " (caption-only sets go under cra:)")
        if not self.path:
            raise ConfigError("path must be set")
        import inspect

        valid = [p for p in inspect.signature(READERS[self.kind]).parameters if p not in ("path", "name")]
        for k in self.options:
            if k not in valid:
                m = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
                raise ConfigError(f"options: {self.kind} has no option {k!r}."
                                  + (f" Did you mean {m[0]!r}?" if m else "") + f" Valid options: {', '.join(valid)}")
        if self.max_missing_fraction is not None and not 0.0 <= self.max_missing_fraction <= 1.0:
            raise ConfigError("max_missing_fraction must be in [0, 1]")
        if len(set(self.templates)) != len(self.templates):
            raise ConfigError(f"templates lists a set twice: {self.templates}")


@dataclass
class EvalCRAConfig:
    kind: str = "shards"  # shards | jsonl | karpathy (see CRA_KINDS)
    path: str = ""
    # query, answer, then further captions (gallery distractors); default per kind (CRA_DEFAULT_FIELDS);
    # karpathy: sentence 1 -> sentence 2 among every sentence of the split
    fields: list[str] = field(default_factory=list)
    split: str = "test"  # karpathy only
    max_samples: int = 0  # first N pairs; 0 = all
    instruction: Optional[str] = None  # for LLM text sides; default: the model's own (see EvalModelConfig)

    def validate(self) -> None:
        _check_choice("kind", self.kind, CRA_KINDS)
        if not self.path:
            raise ConfigError("path must be set")
        if self.kind != "karpathy" and self.fields and len(self.fields) < 2:
            raise ConfigError(f"fields must name the query and the answer caption (then any further captions of "
                              f"the split, which join the gallery), got {self.fields}")
        if self.max_samples < 0:
            raise ConfigError("max_samples must be >= 0")

    def resolved_fields(self) -> list[str]:
        return list(self.fields) or list(CRA_DEFAULT_FIELDS[self.kind])


@dataclass
class EvalRunConfig:
    output: str = "results/eval.json"  # the markdown table goes next to it (.md)
    baseline: str = "auto"  # model the others are compared to (delta columns); auto: the first hf_clip; "" none
    max_missing_fraction: float = 0.0  # fail when more images than this are missing (never score a subset silently)
    batch_size: int = 64  # images per forward, per rank
    text_batch_size: int = 256  # captions per forward for CLIP text towers and the adapter
    text_token_budget: int = 16384  # LLM batches: batch size x longest caption <= this many tokens
    num_workers: int = 4  # image decoding processes per rank
    device: str = "auto"  # auto: cuda:<local rank> when available, else cpu
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # towers' autocast; auto: bf16 on GPU, fp32 on CPU
    text_cache_dir: str = ""  # text feature cache (keyed by encoder fingerprint); "" = off
    progress: bool = True  # tqdm bars on rank 0
    # also write every feature matrix (image / text features, zero-shot classifiers) per model to
    # <output stem>_features/<model>.safetensors, e.g. to reuse an ImageNet classifier elsewhere
    save_features: bool = False

    def validate(self) -> None:
        if not self.output:
            raise ConfigError("output must name the results JSON file")
        if not 0.0 <= self.max_missing_fraction <= 1.0:
            raise ConfigError("max_missing_fraction must be in [0, 1]")
        if self.batch_size < 1 or self.text_batch_size < 1 or self.text_token_budget < 8 or self.num_workers < 0:
            raise ConfigError("batch_size, text_batch_size must be >= 1, text_token_budget >= 8, num_workers >= 0")


@dataclass
class EvalConfig:
    models: dict[str, EvalModelConfig] = field(default_factory=dict)
    datasets: dict[str, EvalDatasetConfig] = field(default_factory=dict)
    cra: dict[str, EvalCRAConfig] = field(default_factory=dict)
    run: EvalRunConfig = field(default_factory=EvalRunConfig)

    def validate(self) -> None:
        if not self.models:
            raise ConfigError("no models to evaluate: add models.<name> (or --model KIND:PATH)")
        if not self.datasets and not self.cra:
            raise ConfigError("nothing to evaluate: add datasets.<name> / cra.<name> (or --dataset / --cra)")
        for section in ("models", "datasets", "cra"):
            for name, entry in getattr(self, section).items():
                if not name or "|" in name:
                    raise ConfigError(f"{section}: invalid name {name!r} (used as a table heading; no '|')")
                try:
                    entry.validate()
                except ConfigError as e:
                    msg = str(e)  # "kind: ..." -> "models.ours.kind: ...", else "models.ours: ..."
                    head = msg.split(":", 1)[0]
                    sep = "." if head in {f.name for f in dataclasses.fields(entry)} else ": "
                    raise ConfigError(f"{section}.{name}{sep}{msg}") from None
        image_models = [n for n, m in self.models.items() if m.kind != "text"]
        if self.datasets and not image_models:
            raise ConfigError("datasets need an image-text model (llm2clip or hf_clip); text models only take part "
                              "in cra")
        b = self.run.baseline
        if b not in ("auto", "") and b not in self.models:
            raise ConfigError(f"run.baseline={b!r} is not a model name; models: {', '.join(self.models)}")

    def baseline_name(self) -> str | None:
        """The model the others are compared against, or None."""
        if self.run.baseline == "auto":
            clips = [n for n, m in self.models.items() if m.kind == "hf_clip"]
            return clips[0] if clips and len(self.models) > 1 else None
        return self.run.baseline or None
