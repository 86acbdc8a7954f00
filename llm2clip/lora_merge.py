"""Merge saved LoRA adapters into a base model folder, streamed tensor by tensor into safetensors shards.

    write_merged(base_dir, [adapter_dir, ...], out_dir, config_updates={"is_causal": False})

Never holds the model: each base tensor is read from its (memory-mapped) safetensors file, merged with
its adapters' `scaling * B @ A` (computed in fp32 for that one tensor, stored back in the base's dtype),
and appended to the current output shard; a shard is written once it reaches `max_shard_bytes`. Peak
host memory is about one shard plus the adapters (MBs), instead of the whole base in fp32 (49 GB at 12B).
The output folder loads with `AutoModel.from_pretrained` (sharded + `model.safetensors.index.json`).
The LM head is left out: the merged model is a text encoder (the backbone), as before.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
_SKIP_PREFIXES = ("lm_head.",)


class MergeError(ValueError):
    pass


def _base_files(base: Path) -> list[Path]:
    idx = base / INDEX
    if idx.is_file():
        return [base / f for f in dict.fromkeys(json.loads(idx.read_text())["weight_map"].values())]
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{base}: no safetensors weights (model.safetensors or {INDEX}); re-save the base "
                         "model with save_pretrained(safe_serialization=True)")
    return files


def _module_key(name: str) -> str:
    """Adapter tensor name -> the base module it adapts, without peft's and the CausalLM's prefixes:
    'base_model.model.layers.0.mlp.up_proj.lora_A.weight' -> 'layers.0.mlp.up_proj'."""
    for p in ("base_model.model.",):
        if name.startswith(p):
            name = name[len(p):]
    mod = name.split(".lora_", 1)[0]
    return mod[len("model."):] if mod.startswith("model.") else mod


def load_adapter(adapter_dir: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{base module key: (A [r, in], B [out, r], scaling)} of a saved plain-LoRA peft adapter."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("fan_in_fan_out"):
        raise MergeError(f"{d}: only plain LoRA adapters stream-merge (peft_type LORA, no DoRA, no fan_in_fan_out)")
    sd = load_file(str(d / "adapter_model.safetensors"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    out: dict[str, list] = {}
    for name, t in sd.items():
        if ".lora_A." in name or ".lora_B." in name:
            out.setdefault(_module_key(name), [None, None])[0 if ".lora_A." in name else 1] = t
        elif t.numel():
            raise MergeError(f"{d}: tensor {name} is not a LoRA factor (modules_to_save / bias are not supported)")
    res = {}
    for key, (a, b) in out.items():
        rank = int(cfg.get("rank_pattern", {}).get(key.rsplit(".", 1)[-1], r))
        alp = float(cfg.get("alpha_pattern", {}).get(key.rsplit(".", 1)[-1], alpha))
        scale = alp / math.sqrt(rank) if cfg.get("use_rslora") else alp / rank
        res[key] = (a, b, scale)
    return res


def write_merged(base_dir: str | Path, adapters: list[str | Path], out_dir: str | Path,
                 config_updates: dict | None = None, max_shard_bytes: int = 2 * 1024 ** 3) -> dict:
    """Write base + adapters (applied in order) to `out_dir`; returns {"tensors", "bytes", "shards", "merged"}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base, out = Path(base_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    deltas = [load_adapter(a) for a in adapters]
    pending: dict[str, torch.Tensor] = {}
    pending_bytes, shards, weight_map, total, merged = 0, [], {}, 0, set()

    def flush():
        nonlocal pending, pending_bytes
        if pending:
            name = f"model-{len(shards) + 1:05d}.safetensors.part"
            save_file(pending, str(out / name), metadata={"format": "pt"})
            shards.append((name, list(pending)))
            pending, pending_bytes = {}, 0

    for f in _base_files(base):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if key.startswith(_SKIP_PREFIXES):
                    continue
                t = sf.get_tensor(key)
                mod = key[:-len(".weight")] if key.endswith(".weight") else None
                mod = mod[len("model."):] if mod and mod.startswith("model.") else mod
                hits = [d[mod] for d in deltas if mod in d]
                if hits:
                    w = t.float()
                    for a, b, scale in hits:
                        if (b.shape[0], a.shape[1]) != tuple(w.shape):
                            raise MergeError(f"adapter factor shapes {tuple(b.shape)} x {tuple(a.shape)} do not match "
                                             f"{key} {tuple(w.shape)} of {base}: adapter trained on another model?")
                        w.addmm_(b.float(), a.float(), alpha=scale)
                    t = w.to(t.dtype)
                    merged.add(mod)
                t = t.contiguous()
                nb = t.numel() * t.element_size()
                if pending and pending_bytes + nb > max_shard_bytes:
                    flush()
                pending[key] = t
                pending_bytes += nb
                total += nb
    flush()
    missing = sorted(k for d in deltas for k in d if k not in merged)
    if missing:
        raise MergeError(f"adapter modules with no matching base weight in {base}: {missing[:3]}...")
    n = len(shards)
    for i, (name, keys) in enumerate(shards):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({k: final for k in keys})
    if n > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(config_updates or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"tensors": len(weight_map), "bytes": total, "shards": n, "merged": len(merged)}


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Tokenizer files of a model folder (what AutoTokenizer reads), copied byte for byte."""
    for f in Path(src).iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))
                            or f.suffix == ".model"):
            shutil.copy2(f, Path(dst) / f.name)
