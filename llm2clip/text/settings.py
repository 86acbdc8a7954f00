"""The one record of how a text encoder embeds captions, and its one reader.

Stage 1 writes it beside its merged export (`llm2clip_text.json`), the embed step records it in the
encoder fingerprint (which stage 2 copies into its export as `text_encoder`); the embed step, the
eval models and `llm2clip.load_model` read it back here, so embed-time and eval-time settings
cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from pathlib import Path
from typing import Any

from llm2clip.config import ConfigError
from llm2clip.schema import TEMPLATES, TextEncoderConfig

log = logging.getLogger("llm2clip")

RECORD_FILE = "llm2clip_text.json"
# settings that change the embedding (all of them are in the fingerprint record too)
ENCODER_KEYS = ("attention", "pooling", "pool_scope", "pool_special_tokens", "template", "max_length")
# where the encoder is and how it pads (not in the fingerprint: a copied model keeps it)
LOCATION_KEYS = ("model_path", "tokenizer_path", "lora_path", "padding_side", "pad_token")


def resolved_special_tokens(cfg: TextEncoderConfig) -> str:
    """text.pool_special_tokens with auto resolved for this model: "yes" | "no"."""
    from llm2clip.text.encoder import ENCODER_ONLY, model_type, pool_special_tokens

    return "yes" if pool_special_tokens(cfg, model_type(cfg.model_path) in ENCODER_ONLY) else "no"


def encoder_settings(cfg: TextEncoderConfig) -> dict[str, Any]:
    """The embedding-defining settings of `cfg`, auto values resolved, template expanded."""
    rec = {k: getattr(cfg, k) for k in ENCODER_KEYS}
    rec["pool_special_tokens"] = resolved_special_tokens(cfg)
    rec["template"] = TEMPLATES.get(cfg.template, cfg.template)
    return rec


def recorded_settings(info: dict[str, Any]) -> dict[str, Any]:
    """Encoder settings + location from a record (stage-1 llm2clip_text.json, or the `text_encoder`
    info stage 2 exports). Records older than pool_scope were made pooling the caption tokens only."""
    out = {k: info[k] for k in ENCODER_KEYS + LOCATION_KEYS if info.get(k) not in (None, "")}
    if "pooling" in info and "pool_scope" not in info:
        out.update(pool_scope="caption", pool_special_tokens="no")
    return out


def find_export_record(cfg: TextEncoderConfig) -> tuple[Path | None, dict[str, Any]]:
    """The stage-1 record that goes with `cfg`'s model (or its LoRA adapter), if any."""
    candidates = [Path(cfg.model_path) / RECORD_FILE]
    if cfg.lora_path:  # base + adapter from a stage-1 export: <run>/export/{adapter,merged}
        candidates += [Path(cfg.lora_path) / RECORD_FILE, Path(cfg.lora_path).parent / "merged" / RECORD_FILE]
    path = next((p for p in candidates if p.is_file()), None)
    return path, (json.loads(path.read_text()) if path else {})


def check_against_export(cfg: TextEncoderConfig) -> None:
    """A stage-1 export records how it was trained; embedding it another way is a silent bug."""
    path, info = find_export_record(cfg)
    if path is None:
        return
    theirs = recorded_settings(info)
    mine = encoder_settings(cfg)
    no_tail = not mine["template"].partition("{text}")[2]  # then pool_scope pools the same tokens either way
    for key in ("pooling", "attention", "template", "pool_scope", "pool_special_tokens"):
        if key == "pool_scope" and no_tail:
            continue
        t = TEMPLATES.get(theirs[key], theirs[key]) if key == "template" and key in theirs else theirs.get(key)
        if t is not None and mine[key] != t:
            shown = cfg.template if key == "template" else mine[key]
            raise ConfigError(f"text.{key}={shown!r} but {path} was trained with {key}={t!r}; set text.{key} to match")
    if theirs.get("max_length") and theirs["max_length"] != cfg.max_length:
        log.info(f"note: text.max_length={cfg.max_length} (stage 1 trained with {theirs['max_length']})")


def text_encoder_config(base: dict[str, Any], overrides: dict[str, Any], label: str) -> TextEncoderConfig:
    """TextEncoderConfig from recorded settings + user overrides (later wins; empty values ignored).

    Values are checked against the field types (a Literal's choices, int / str) so a typo in an
    override fails here, naming the key."""
    hints = typing.get_type_hints(TextEncoderConfig)
    kwargs: dict[str, Any] = {"pad_token": "eos"}  # pad positions are masked out; the pad id never changes an embedding
    for src, where in ((base, "recorded text encoder"), (overrides, f"{label}.text")):
        for k, v in src.items():
            if k not in hints or v is None or v == "":
                continue
            tp = hints[k]
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            if choices is not None and v not in choices:
                raise ConfigError(f"{where}.{k}: {v!r} is not one of {list(choices)}")
            if tp in (int, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise ConfigError(f"{where}.{k}: expected a number, got {v!r}")
            if tp is bool and not isinstance(v, bool):
                raise ConfigError(f"{where}.{k}: expected true/false, got {v!r}")
            kwargs[k] = tp(v) if tp in (int, float, str) else v
    names = {f.name for f in dataclasses.fields(TextEncoderConfig)}
    return TextEncoderConfig(**{k: v for k, v in kwargs.items() if k in names})
