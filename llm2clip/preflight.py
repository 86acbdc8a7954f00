"""Preflight: before any model loads, resolve every path a training run will need and report every
problem at once, each naming its config key and path.

    check_training_paths(cfg)   # Stage1Config or Stage2Config; raises PreflightError listing all problems

Covers the run directory (writable), the DeepSpeed JSON (found, valid, agrees with our config), model
folders (config.json present), training and validation shards (each pattern matches), stage-2 sidecars
(the stage-2 task's own check), the embed config it may run, and caption fields: a configured field
that none of the first samples of the shards has is reported with the fields each shard does have.
Rank 0 looks (a shared filesystem can lag elsewhere); every rank raises the same error.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from llm2clip import distributed as D
from llm2clip.config import ConfigError
from llm2clip.ds_config import build_ds_config

FIELD_PROBE_SHARDS = 8  # shards whose first samples are read to see which caption fields exist
FIELD_PROBE_SAMPLES = 32  # samples read per probed shard


class PreflightError(ConfigError):
    """Problems found before any model loaded; the message lists every one as `key: path: what`."""


Problem = tuple[str, str, str]  # (config key, path, what is wrong)


def check_training_paths(cfg: Any) -> None:
    """Raise PreflightError naming every problem, on every rank (collective when distributed)."""
    problems = D.broadcast_object(find_problems(cfg) if D.get_rank() == 0 else None)
    if problems:
        lines = [f"  {k}: {p}: {w}" if p else f"  {k}: {w}" for k, p, w in problems]
        raise PreflightError(f"{len(problems)} problem(s) found before loading any model:\n" + "\n".join(lines))


def find_problems(cfg: Any) -> list[Problem]:
    from llm2clip.schema import Stage1Config
    from llm2clip.schema_stage2 import Stage2Config

    out: list[Problem] = []
    _output_dir(cfg.run.output_dir, out)
    _deepspeed(cfg, out)
    if isinstance(cfg, Stage1Config):
        _stage1(cfg, out)
    elif isinstance(cfg, Stage2Config):
        _stage2(cfg, out)
    return out


# ---- pieces ------------------------------------------------------------------------------------

def _output_dir(path: str, out: list[Problem]) -> None:
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".preflight.{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        out.append(("run.output_dir", str(p), f"not writable ({e.strerror or e})"))


def _deepspeed(cfg: Any, out: list[Problem]) -> None:
    try:
        build_ds_config(cfg.train, cfg.optim, max(D.get_world_size(), 1))
    except ConfigError as e:
        out.append(("train.deepspeed_config", "", str(e).removeprefix("train.deepspeed_config: ")))


def _model_folder(key: str, path: str, out: list[Problem], marker: str = "config.json") -> None:
    p = Path(path).expanduser()
    if not p.is_dir():
        out.append((key, path, "no such folder (a local model folder is needed; hub ids are not fetched)"))
    elif not (p / marker).is_file():
        out.append((key, path, f"no {marker} in this folder: not a saved model"))


def _shards(key: str, spec: str, out: list[Problem]) -> list[list[str]]:
    """Expand each '::' part; a part matching nothing is a problem. Returns the shards per part."""
    from llm2clip.data.shards import expand_shards

    parts = []
    for part in [x for x in spec.split("::") if x.strip()]:
        try:
            parts.append(expand_shards(part))
        except FileNotFoundError:
            out.append((key, part.strip(), "matches no file"))
        except (ValueError, OSError) as e:
            out.append((key, part.strip(), str(e)))
    return parts


def _file(key: str, path: str, out: list[Problem]) -> None:
    if not Path(path).expanduser().is_file():
        out.append((key, path, "no such file"))


def shard_fields(shard: str, n_samples: int = FIELD_PROBE_SAMPLES) -> tuple[set[str], int, bool]:
    """Caption field specs ("txt", "json:NAME") non-empty in any of a shard's first samples, how many
    samples were read, and whether reading failed (then the shard is no evidence either way)."""
    import json

    from llm2clip.data.shards import ReadStats, iter_tar_samples

    found: set[str] = set()
    n = 0
    rs = ReadStats()
    for n, s in enumerate(iter_tar_samples(shard, rs, want={"txt", "json"}, count=n_samples), 1):
        txt = s.get("txt")
        if isinstance(txt, bytes) and txt.strip():
            found.add("txt")
        try:
            meta = json.loads(s["json"]) if "json" in s else {}
        except ValueError:
            meta = {}
        if isinstance(meta, dict):
            found.update(f"json:{k}" for k, v in meta.items()
                         if (isinstance(v, str) and v.strip()) or (isinstance(v, list) and v))
        if n >= n_samples:
            break
    return found, n, bool(rs.read_errors)


def _fields(key: str, shards_key: str, shards: list[str], fields: list[str], need: int | None,
            out: list[Problem]) -> None:
    """Fields of `fields` that none of the probed shards has. need=None: every field is required (one
    problem per missing field); need=k: at least k of them must exist somewhere (else one problem)."""
    if not shards or not fields:
        return
    step = max(1, len(shards) // FIELD_PROBE_SHARDS)
    read = {s: shard_fields(s) for s in shards[::step][:FIELD_PROBE_SHARDS]}
    probed = {s: (f, n) for s, (f, n, failed) in read.items() if not failed}  # read errors: counted in training
    if not probed:
        return
    have = set().union(*(f for f, _ in probed.values()))
    missing = [f for f in fields if f not in have]
    if not missing or (need is not None and len(fields) - len(missing) >= need):
        return
    n_read = sum(n for _, n in probed.values())
    seen = "; ".join(f"{Path(s).name}: {', '.join(sorted(f)) or ('(empty shard)' if n == 0 else '(no caption)')}"
                     for s, (f, n) in probed.items())
    where = f"the first {n_read} samples of {len(probed)} of {len(shards)} shard(s) of {shards_key}"
    if need is None:
        for f in missing:
            out.append((key, f, f"no sample has this caption field in {where}; those shards have: {seen}"))
    else:
        out.append((key, ", ".join(missing), f"{len(fields) - len(missing)} of these fields exist in {where}, "
                                            f"{need} needed; those shards have: {seen}"))


def _stage1(cfg: Any, out: list[Problem]) -> None:
    t = cfg.text
    _model_folder("text.model_path", t.model_path, out)
    if t.tokenizer_path:
        _model_folder("text.tokenizer_path", t.tokenizer_path, out, "tokenizer_config.json")
    if t.lora_path:
        _model_folder("text.lora_path", t.lora_path, out, "adapter_config.json")
    for i, src in enumerate(cfg.data.sources):
        key = f"data.sources[{i}].path"
        parts = _shards(key, src.path, out)
        if src.kind == "shards":
            _fields(f"data.sources[{i}].fields", key, [s for p in parts for s in p], src.fields, 2, out)
    if cfg.data.val_path:
        parts = _shards("data.val_path", cfg.data.val_path, out)
        _fields("data.val_fields", "data.val_path", [s for p in parts for s in p], cfg.data.val_fields, None, out)


def _stage2(cfg: Any, out: list[Problem]) -> None:
    d = cfg.data
    _model_folder("vision.path", cfg.vision.path, out)
    online = cfg.text.mode == "online"
    if online:
        _model_folder("text.encoder.model_path", cfg.text.encoder.model_path, out)
    train = [s for p in _shards("data.shards", d.shards, out) for s in p]
    val = [s for p in _shards("data.val_shards", d.val_shards, out) for s in p] if d.val_shards else []
    if d.missing_sidecars == "embed":
        _file("data.embed_config", d.embed_config, out)
    if online:  # captions come from the shards themselves
        _fields("data.dense_fields/data.original_fields", "data.shards", train,
                list(dict.fromkeys(d.dense_fields + d.original_fields)), 1, out)
        _fields("data.val_field", "data.val_shards", val, [d.val_field], None, out)
        return
    # offline: the sidecars hold the embedded fields; the stage-2 task's own check says what is wrong
    from llm2clip.data.sidecar import check_sidecars, sidecar_path_for

    for key, shards, fields, may_embed in (
            ("data.shards", train, list(dict.fromkeys(d.dense_fields + d.original_fields)), True),
            ("data.val_shards", val, [d.val_field], False)):
        if not shards:
            continue
        if may_embed and d.missing_sidecars == "embed":
            continue  # the embed step writes missing and replaces invalid ones before training
        missing, invalid = check_sidecars(shards, d.sidecar, d.fingerprint or None, fields)
        if missing:
            eg = "; ".join(f"{sidecar_path_for(s, d.sidecar)} (for {s})" for s in missing[:3])
            out.append((f"{key} (sidecars: data.sidecar)", "",
                        f"{len(missing)} of {len(shards)} shards have no complete sidecar, e.g. {eg}"
                        f"{' ...' if len(missing) > 3 else ''}; run the embed step first (python tools/embed_captions.py "
                        "--config <embed.yaml>, or sbatch slurm/embed.sh)"
                        + (", or set data.missing_sidecars=embed with data.embed_config=<embed.yaml>" if may_embed else "")))
        for _, reason in invalid[:5]:
            out.append((f"{key} (sidecars: data.sidecar)", "", reason))
        if len(invalid) > 5:
            out.append((f"{key} (sidecars: data.sidecar)", "", f"... and {len(invalid) - 5} more invalid sidecars"))
